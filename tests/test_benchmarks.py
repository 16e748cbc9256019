"""The benchmarks' bookkeeping: the quality summary and its --resume check; the GPU benchmark as a CPU smoke run."""
import json
import statistics

import pytest

from benchmarks import quality, tasks

CONFIG = {"task": "wordnet", "n_total": 32, "bank": 128, "steps": 12, "seeds": 2, "lr": 1e-4,
          "eval_queries": 300, "corpus": 1000}
RUNS = [
    {"method": "gradaccum", "seed": 0, "ndcg@10": 0.50, "recall@100": 0.80, "grad_norm_ratio": [1.0, 1.2]},
    {"method": "contaccum-128", "seed": 0, "ndcg@10": 0.52, "recall@100": 0.81, "grad_norm_ratio": [1.1, 1.3]},
    {"method": "gradaccum", "seed": 1, "ndcg@10": 0.54, "recall@100": 0.82, "grad_norm_ratio": [1.4, 1.4]},
]
BEFORE = {"ndcg@10": 0.49, "recall@100": 0.79}


def test_summary_is_mean_and_sd_over_seeds_in_first_seen_order(tmp_path):
    path = tmp_path / "q.json"
    table = quality.save(path, CONFIG, BEFORE, RUNS)
    assert [e["method"] for e in table] == ["gradaccum", "contaccum-128"]
    grad = table[0]
    assert grad["runs"] == 2
    assert grad["ndcg@10"] == pytest.approx(0.52)
    assert grad["ndcg@10_sd"] == pytest.approx(statistics.stdev([0.50, 0.54]))
    assert grad["mean_grad_norm_ratio"] == pytest.approx((1.1 + 1.4) / 2)
    assert table[1]["ndcg@10_sd"] == 0.0  # one seed: no spread, not an error
    saved = json.loads(path.read_text())
    assert saved["runs"] == RUNS and saved["pretrained"] == BEFORE and saved["n_total"] == 32


def test_resume_keeps_runs_when_only_the_seed_count_differs(tmp_path):
    path = tmp_path / "q.json"
    quality.save(path, CONFIG, BEFORE, RUNS)
    runs, before = quality.load_runs(path, {**CONFIG, "seeds": 3})
    assert runs == RUNS and before == BEFORE


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    path = tmp_path / "q.json"
    quality.save(path, CONFIG, BEFORE, RUNS)
    with pytest.raises(SystemExit, match="steps.*12, 20"):
        quality.load_runs(path, {**CONFIG, "steps": 20})


def test_runs_made_apart_merge_into_one_table_and_other_settings_are_refused(tmp_path):
    from benchmarks import staleness

    parts = []
    for seed in (0, 1):  # one process per seed, as benchmarks/gpu_staleness.sh runs them
        parts.append(str(tmp_path / f"seed{seed}.json"))
        quality.save(parts[-1], {**CONFIG, "seeds": 1}, BEFORE, [r for r in RUNS if r["seed"] == seed])
    staleness.merge(str(tmp_path / "merged.json"), parts)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["seeds"] == 2 and sorted(map(str, merged["runs"])) == sorted(map(str, RUNS))
    assert merged["table"][0]["runs"] == 2 and merged["table"][0]["ndcg@10"] == pytest.approx(0.52)
    quality.save(str(tmp_path / "other.json"), {**CONFIG, "lr": 5e-5}, BEFORE, RUNS[:1])
    with pytest.raises(SystemExit, match="other settings"):
        staleness.merge(str(tmp_path / "bad.json"), parts + [str(tmp_path / "other.json")])


def test_staleness_runs_diagnostics_only_when_named_and_refuses_unknown_methods():
    from benchmarks import staleness

    every = staleness.choose(128, 4, 150, None)
    assert "contaccum-512-query-bank-128" not in every and "contaccum-512-fresh" in every
    named = staleness.choose(128, 4, 150, "contaccum-512-query-bank-128,gradaccum")
    assert list(named) == ["contaccum-512-query-bank-128", "gradaccum"]
    per_device, k, query_bank, passage_bank = named["contaccum-512-query-bank-128"][:4]
    assert (per_device * k, query_bank, passage_bank) == (128, 128, 512)  # N_total rows, 4 x N_total columns
    with pytest.raises(SystemExit, match="unknown.*contaccum-64"):
        staleness.choose(128, 4, 150, "contaccum-64")


def test_a_task_built_here_loads_on_another_machine_unchanged(tmp_path, monkeypatch):
    from datasets import Dataset

    task = (Dataset.from_dict({"query": ["a", "b"], "positive": ["x", "y"], "positive_id": ["1", "2"]}),
            {"q0": "a"}, {"1": "x", "2": "y"}, {"q0": {"1": 1}})
    tasks.save_task(str(tmp_path / "debian.json.gz"), task)
    monkeypatch.setenv("CONTACCUM_BENCH_TASKS", str(tmp_path))
    train, queries, corpus, qrels = tasks.load_task("debian", 500, 3000)  # the carried file, not apt's lists
    assert train.to_dict() == task[0].to_dict() and (queries, corpus, qrels) == task[1:]


@pytest.mark.slow
def test_gpu_paper_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path):
    """The GPU benchmark's whole path (processes, Trainer loops, timer, JSON) as a CPU smoke run."""
    from benchmarks import gpu_paper

    out = tmp_path / "gpu_paper.json"
    gpu_paper.main(["--tiny", "--n_total", "16", "--steps", "1", "--warmup", "1", "--out", str(out),
                    "--methods", "gradaccum,contaccum-1024,hybrid,st-cmnrl", "--attention", "no-cudnn"])
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["gradaccum", "contaccum-1024", "hybrid", "st-cmnrl"]
    assert all(r["attention"] == "no-cudnn" for r in results)  # the kernel choice reached each method's process
    assert all(r.get("seconds_per_step", 0) > 0 and len(r["step_times"]) == 1 for r in results), results
    assert gpu_paper.layout("hybrid", 512) == (512, 1, 8192, 8) and gpu_paper.layout("contaccum-1024", 512)[1] == 64


@pytest.mark.slow
def test_cuda_graphs_probe_compares_every_variant_with_eager(tmp_path):
    """cuda_graphs.py's loop (BiEncoder + ContAccumLoss, K = 4, a bank, hard negatives) as a CPU smoke run, where
    inductor runs without CUDA graphs: every variant trains like eager, and the parameters move by far more than
    they differ (so a wrong gradient, e.g. one micro-batch's instead of four, would show on a GPU)."""
    from benchmarks import cuda_graphs

    out = tmp_path / "cuda_graphs.json"
    report = cuda_graphs.main(["--out", str(out)])
    assert json.loads(out.read_text())["correctness"] == report["correctness"]
    assert list(report["correctness"]) == list(cuda_graphs.VARIANTS)
    for name, result in report["correctness"].items():
        assert result["max_param_diff_vs_eager"] < 1e-5 and result["max_param_change"] > 1e-2, (name, result)


def test_a_micro_step_dispatches_few_ops_of_ours(tmp_path):
    """launch_count through the Trainer's loop (tiny BERT, N_total 32 in micro-batches of 8): the ops this library
    adds to each micro-step, which on a launch-bound GPU each cost about a kernel launch's host time, stay few
    (the code before these were cut, fec573e: 79 for GradAccum, 179 with a bank of 8,192, and this test failed;
    now 50 and 106; the encoder, its backward and the optimizer ~510). A count, not a time: the same on every
    machine for one torch version."""
    from benchmarks import launch_count

    out = tmp_path / "launch_count.json"
    results = launch_count.main(["--methods", "gradaccum,contaccum-8192", "--n_total", "32", "--out", str(out)])
    ours = {r["method"]: r["library_compute_ops_per_micro_step"] for r in results}
    assert ours["gradaccum"] <= 55 and ours["contaccum-8192"] <= 115, ours
    everything = {r["method"]: r["compute_ops_per_micro_step"] for r in results}
    assert everything["contaccum-8192"] - everything["gradaccum"] <= 80, everything  # the bank's own ops
    assert json.loads(out.read_text())["results"][1]["per_source"]["hf_contaccum/core/bank.py"]["compute"] > 0


def test_code_search_task_pairs_docstring_sentences_with_code_without_docstrings(tmp_path):

    functions = "\n".join(
        f'def f{i}(x):\n    """Return the number {i} added to the value given.\n\n    More text.\n    """\n'
        f"    y = x + {i}\n    return y\n" for i in range(40))
    generic = '\ndef g1():\n    """Return a copy of the thing here."""\n    a = 1\n    return a\n' \
              '\ndef g2():\n    """Return a copy of the thing here."""\n    b = 2\n    return b\n'
    twin = 'def f0(x):\n    """Another sentence about this same code."""\n    y = x + 0\n    return y\n'  # f0's code again
    (tmp_path / "mod.py").write_text(functions + generic)
    (tmp_path / "other.py").write_text(twin)
    (tmp_path / "test_skipped.py").write_text(functions)
    train, queries, corpus, qrels = tasks.load_code_search(root=str(tmp_path))
    texts = list(train["query"]) + list(queries.values())
    assert "Return the number 3 added to the value given." in texts and not any("More text" in t for t in texts)
    code = corpus["fn:mod.py:f3:" + str(1 + 8 * 3)]
    assert code == "def f3(x):\n    y = x + 3\n    return y" and '"""' not in code
    assert not any(":f0:" in did for did in corpus)  # code that is not unique is dropped
    for qid, judged in qrels.items():  # a shared sentence (g1, g2) makes both relevant
        assert all(did in corpus for did in judged)
        if queries[qid] == "Return a copy of the thing here.":
            assert len(judged) == 2
    assert len(train) + sum(len(j) for j in qrels.values()) == len(corpus)  # train and test split the functions
    assert not set(train["query"]) & set(queries.values())

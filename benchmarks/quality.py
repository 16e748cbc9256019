"""Retrieval quality of the training methods side by side, on real data, same model, same
learning rate and number of optimizer steps (so the same pairs seen, except DPR with a
small batch, which sees N_total/8 times fewer), several seeds: mean +- sd of nDCG@10 and
Recall@100. Also quality against the bank size (paper fig. 3) and GradNormRatio over
training with and without the query bank (paper fig. 5).

Model: the offline all-MiniLM-L6-v2. Tasks (--task):
  wordnet  the bundled WordNet 3.0 extract, reverse dictionary (query = definition of a test
           synset, relevant = its lemmas);
  debian   Debian package search (query = a package's synopsis, relevant = its description),
           built from the machine's apt lists: see benchmarks/debian_packages.py.
  code     Python code search (query = a docstring's first sentence, relevant = the function's
           code), built from the interpreter's standard library: see benchmarks/code_search.py.

    python -m benchmarks.quality --quick                 # N_total 32, 3 seeds; ~8 min on 2 CPU cores
    python -m benchmarks.quality                         # N_total 128, 3 seeds (hours on a CPU)
    python -m benchmarks.quality --task debian --quick
    python -m benchmarks.quality ... --resume            # go on after a stop, or add --sweep sizes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from benchmarks.harness import device, device_name
from benchmarks.tasks import load_task

N_LOCAL = 8


def layouts(n_total, bank):
    """method -> (per-device batch, K, query bank, passage bank, GradCache chunk, steps multiplier)."""
    k = n_total // N_LOCAL
    return {
        "dpr-small": (N_LOCAL, 1, 0, 0, None, 1),
        "gradaccum": (N_LOCAL, k, 0, 0, None, 1),
        "gradcache": (n_total, 1, 0, 0, N_LOCAL, 1),
        "prebatch": (N_LOCAL, k, 0, bank, None, 1),
        f"contaccum-{bank}": (N_LOCAL, k, bank, bank, None, 1),
        "full-batch": (n_total, 1, 0, 0, None, 1),
    }


# (query, passage) max lengths in tokens: definitions are long and lemmas short; synopses are
# short and descriptions long
MAX_LENGTHS = {"wordnet": (64, 32), "debian": (32, 64), "code": (32, 128)}


def encoder_path() -> str:
    """The offline MiniLM, or the folder in $CONTACCUM_BENCH_ENCODER (a GPU machine: see gpu_carry.py)."""
    from hf_contaccum.quickstart import default_encoder_path

    return os.environ.get("CONTACCUM_BENCH_ENCODER") or default_encoder_path()


# an encoder with no pretraining at all (MiniLM's tokenizer and vocabulary, random weights): where the paper's
# raw-LM regime is out of reach offline, the other end from a contrastively trained MiniLM
SCRATCH = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}


def build_model(encoder: str = "minilm"):
    """The pretrained MiniLM ("minilm"), or a randomly initialised encoder ("scratch": SCRATCH's shape; draw from
    torch's global RNG, so seed it first)."""
    from hf_contaccum import BiEncoder

    if encoder == "minilm":
        return BiEncoder.from_encoder(encoder_path(), normalize=True)
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(encoder_path())
    model = BiEncoder.from_encoder_config(BertConfig(vocab_size=tokenizer.vocab_size, **SCRATCH), normalize=True)
    model.tokenizer = tokenizer
    return model


def train_and_evaluate(method, layout, seed, steps, evaluator, train, lr, output_dir, max_lengths, encoder="minilm"):
    from hf_contaccum import ContAccumTrainer, ContAccumTrainingArguments

    per_device, k, qbank, pbank, chunk, _, *more = layout  # optional 7th: further training arguments
    more = dict(more[0]) if more else {}
    torch.manual_seed(seed)
    model = build_model(encoder)
    args = ContAccumTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=k,
        max_steps=steps, learning_rate=lr, warmup_steps=0.1, max_grad_norm=2.0, seed=seed, data_seed=seed,
        memory_bank_size=pbank, query_memory_bank_size=qbank,
        gradcache_chunk_size=chunk, temperature=0.05, query_max_length=max_lengths[0], passage_max_length=max_lengths[1],
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=device() == "cpu", disable_tqdm=True,
        **more)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pre-batch ablation warns about gradient-norm imbalance, by design
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=train, processing_class=model.tokenizer)
    from hf_contaccum import EmbeddingCollapseError

    stopped = {}
    try:
        trainer.train()
    except EmbeddingCollapseError:  # the guard stopped it: a result too (the model as it was when stopped)
        stopped = {"collapse_guard_stopped_at_step": trainer.state.global_step}
    metrics = evaluator(model)
    ratios = [h["grad_norm_ratio"] for h in trainer.state.log_history if "grad_norm_ratio" in h]
    # the training loss per optimizer step (uniform value: the log of a row's candidates), what the collapse
    # guard reads: kept so that its thresholds can be checked against the runs
    losses = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]  # (the final summary logs train_loss)
    return {"method": method, "seed": seed, "ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"],
            "grad_norm_ratio": ratios, "loss": losses, "device": device_name(), **stopped}


def plot(table, results, sweep_methods, bank_sizes, main_method, path):
    """Fig. 3 from the per-method summary that save() wrote; fig. 5 from the runs' GradNormRatio curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {e["method"]: e for e in table}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    swept = [(bank, summary[m]) for bank, m in zip(bank_sizes, sweep_methods) if m in summary]
    xs = [bank for bank, _ in swept]
    axes[0].errorbar(xs, [e["ndcg@10"] for _, e in swept], yerr=[e["ndcg@10_sd"] for _, e in swept], marker="o",
                     capsize=3, label="ContAccum (N_local 8 x K)")
    # the exact large-batch methods at the same N_total, as the bar the bank has to clear
    for method, style in (("gradcache", ":"), ("full-batch", "--")):
        if method in summary and xs:
            axes[0].hlines(summary[method]["ndcg@10"], min(xs), max(xs), linestyles=style, colors="gray",
                           label=f"{method} (mean)")
    axes[0].legend()
    axes[0].set_xscale("symlog", base=2)
    axes[0].set_xlabel("N_mem (0 = gradient accumulation)")
    axes[0].set_ylabel("nDCG@10")
    axes[0].set_title("quality against bank size (cf. paper fig. 3)")
    for method, style in ((main_method, "-"), ("prebatch", "--")):
        runs = [r["grad_norm_ratio"] for r in results if r["method"] == method and r["grad_norm_ratio"]]
        if runs:
            length = min(len(r) for r in runs)
            mean = [statistics.mean(r[i] for r in runs) for i in range(length)]
            axes[1].plot(range(1, length + 1), mean, style,
                         label=f"{method} ({'both banks' if method != 'prebatch' else 'passage bank only'})")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("GradNormRatio (passage / query)")
    axes[1].set_title("gradient-norm balance (cf. paper fig. 5)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--task", choices=sorted(MAX_LENGTHS), default="wordnet")
    parser.add_argument("--n_total", type=int, default=None)
    parser.add_argument("--bank", type=int, default=None, help="N_mem of the ContAccum and pre-batch runs")
    parser.add_argument("--sweep", type=int, nargs="*", default=None, help="extra N_mem values for the fig. 3 plot")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval_queries", type=int, default=None)
    parser.add_argument("--corpus_size", type=int, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the output JSON (same settings) and run only the missing ones")
    parser.add_argument("--output", default=None, help="path prefix; default benchmarks/results/quality/quality_<task>")
    args = parser.parse_args()
    n_total = args.n_total or (32 if args.quick else 128)
    bank = args.bank or (128 if args.quick else 1024)
    sweep = args.sweep if args.sweep is not None else ([512] if args.quick else [128, 512, 4096])
    steps = args.steps or (12 if args.quick else 60)
    eval_queries = args.eval_queries or (300 if args.quick else 1500)
    corpus_size = args.corpus_size or (1000 if args.quick else 7500)

    from hf_contaccum.evaluation import RetrievalEvaluator

    output = args.output or f"benchmarks/results/quality/quality_{args.task}"
    max_lengths = MAX_LENGTHS[args.task]
    train, queries, corpus, qrels = load_task(args.task, eval_queries, corpus_size)
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(10, 100), query_max_length=max_lengths[0],
                                   passage_max_length=max_lengths[1], show_progress=False)
    methods = layouts(n_total, bank)
    for extra in sweep:
        methods[f"contaccum-{extra}"] = (N_LOCAL, n_total // N_LOCAL, extra, extra, None, 1)
    from hf_contaccum import BiEncoder

    suffix = "_quick" if args.quick else ""
    path = output + suffix + ".json"
    config = {"task": args.task, "n_total": n_total, "bank": bank, "steps": steps, "seeds": args.seeds, "lr": args.lr,
              "eval_queries": len(evaluator.queries), "corpus": len(corpus)}
    results, before = load_runs(path, config) if args.resume and os.path.exists(path) else ([], None)
    if before is None:
        before = evaluator(BiEncoder.from_encoder(encoder_path(), normalize=True))
    print("pretrained:", json.dumps(before), flush=True)
    done = {(r["method"], r["seed"]) for r in results}
    os.makedirs(os.path.dirname(output), exist_ok=True)
    for seed in range(args.seeds):
        for method, layout in methods.items():
            if (method, seed) in done:
                continue
            r = train_and_evaluate(method, layout, seed, steps, evaluator, train, args.lr, "/tmp/quality_run",
                                   max_lengths)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("grad_norm_ratio", "loss")}), flush=True)
            save(path, config, before, results)  # after every run: a stopped benchmark keeps what it measured
    table = save(path, config, before, results)
    print(f"\n{'method':<18}{'nDCG@10':>16}{'Recall@100':>16}{'GradNormRatio':>15}")
    print(f"{'pretrained':<18}{before['ndcg@10']:>16.4f}{before['recall@100']:>16.4f}")
    for e in table:
        gnr = f"{e['mean_grad_norm_ratio']:.3f}" if e["mean_grad_norm_ratio"] else "-"
        print(f"{e['method']:<18}{e['ndcg@10']:>9.4f} ± {e['ndcg@10_sd']:.4f}"
              f"{e['recall@100']:>9.4f} ± {e['recall@100_sd']:.4f}{gnr:>15}")
    # every bank size measured so far goes on the fig. 3 plot, including those of earlier --resume runs
    bank_sizes = {int(r["method"].split("-")[1]) for r in results if r["method"].startswith("contaccum-")}
    sweep = sorted(bank_sizes - {bank})
    sweep_sizes = sorted([0] + sweep + [bank])
    sweep_methods = ["gradaccum" if b == 0 else f"contaccum-{b}" for b in sweep_sizes]
    plot(table, results, sweep_methods, sweep_sizes, f"contaccum-{bank}", output + suffix + ".png")


def load_runs(path, config):
    """The runs and pretrained metrics of an earlier run with the same settings (seeds may differ).

    An interrupted run (or one with fewer sweep points) goes on where it stopped; mixing settings would put
    incomparable numbers in one table, so that is refused."""
    with open(path) as f:
        saved = json.load(f)
    differing = {k: (saved.get(k), v) for k, v in config.items() if k != "seeds" and saved.get(k) != v}
    if differing:
        raise SystemExit(f"--resume: {path} was made with other settings (saved, now): {differing}; "
                         "use the same settings or another --output")
    return saved["runs"], saved["pretrained"]


def save(path, config, before, results):
    """Write the per-method summary (mean ± sd over seeds) and every run; returns the summary."""
    table = []
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        entry = {"method": method, "runs": len(rows)}
        for metric in ("ndcg@10", "recall@100"):
            vals = [r[metric] for r in rows]
            entry[metric] = statistics.mean(vals)
            entry[metric + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ratios = [statistics.mean(r["grad_norm_ratio"]) for r in rows if r["grad_norm_ratio"]]
        entry["mean_grad_norm_ratio"] = statistics.mean(ratios) if ratios else None
        table.append(entry)
    with open(path, "w") as f:
        json.dump({**config, "pretrained": before, "table": table, "runs": results}, f, indent=1)
    return table


if __name__ == "__main__":
    main()

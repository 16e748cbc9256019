"""Hard-negative mining: its cost against sentence-transformers' mine_hard_negatives, and what it does to quality.

speed: the offline MiniLM (one SentenceTransformer object for both, so only the mining differs), queries = WordNet
  training definitions, corpus = every synset's lemma passage of the full WordNet 3.0 (../shared/data, ~100k
  distinct passages), 3 negatives per query; each method in its own process (its own peak memory), in alternating
  order over rounds; seconds and peak RSS per run, seconds per 1,000 queries.
quality: ContAccum ("auto" bank, N_total 32 = 8 x 4, 100 steps, lr 1e-4, cos / 0.05) trained on a task's pairs
  alone, with one mined hard negative per pair, and with one mined through a false-negative filter (relative_margin
  0.05: a negative scores at least 5 % below its positive; ranks from 3 on); nDCG@10 over seeds. Negatives are
  mined by the pretrained MiniLM from the training positives only (no test passage); a task with more than
  --train_rows pairs keeps that many (a seeded sample), as a run reads only steps x N_total of them.

    python -m benchmarks.mining --part speed --synsets ../shared/data/wordnet/synsets.jsonl.gz --queries 1000
    python -m benchmarks.mining --part quality --task wordnet --seeds 3
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import time

from benchmarks.harness import module_command, module_env, write_result

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mining")
VARIANTS = {"pairs": None, "mined": {"num_negatives": 1}, "mined-filtered": {"num_negatives": 1, "range_min": 3,
                                                                            "relative_margin": 0.05}}


def wordnet_mining_task(synsets: str, num_queries: int):
    """(rows of WordNet train definitions and their lemma passages, every synset's distinct passage)."""
    from hf_contaccum.data.sample import passage_text

    with gzip.open(synsets, "rt", encoding="utf-8") as f:
        synsets = [json.loads(line) for line in f]
    corpus = list(dict.fromkeys(passage_text(s) for s in synsets))
    rows = [{"query": s["definition"], "positive": passage_text(s)} for s in synsets if s["split"] == "train"]
    return rows[:num_queries], corpus


def one_speed_run(method: str, synsets: str, num_queries: int, batch_size: int) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from hf_contaccum.quickstart import default_encoder_path

    rows, corpus = wordnet_mining_task(synsets, num_queries)
    model = SentenceTransformer(default_encoder_path(), device="cpu")
    start = time.perf_counter()
    if method == "hf_contaccum":
        from hf_contaccum.retrieval.mining import mine_hard_negatives

        mined = mine_hard_negatives(rows, model, corpus, num_negatives=3, batch_size=batch_size,
                                    corpus_chunk_size=20_000, show_progress=False)
    else:
        from sentence_transformers.util import mine_hard_negatives

        mined = mine_hard_negatives(Dataset.from_list(rows), model, corpus=corpus, num_negatives=3,
                                    batch_size=batch_size, output_format="n-tuple", use_faiss=True, verbose=False)
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": seconds, "seconds_per_1000_queries": 1000 * seconds / len(rows),
            "queries": len(rows), "corpus": len(corpus), "rows_out": len(mined),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed(args) -> dict:
    runs = []
    for round_ in range(args.rounds):
        for method in (("hf_contaccum", "sentence-transformers") if round_ % 2 == 0 else
                       ("sentence-transformers", "hf_contaccum")):
            proc = subprocess.run([*module_command(__file__), "--one", method, "--synsets", args.synsets,
                                   "--queries", str(args.queries)], capture_output=True, text=True, check=True,
                                  env=module_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    summary = {m: {key: statistics.median(r[key] for r in runs if r["method"] == m)
                   for key in ("seconds", "seconds_per_1000_queries", "peak_rss_mib")}
               for m in ("hf_contaccum", "sentence-transformers")}
    summary["ratio_seconds"] = summary["hf_contaccum"]["seconds"] / summary["sentence-transformers"]["seconds"]
    return {"queries": args.queries, "corpus": runs[0]["corpus"], "rounds": args.rounds, "runs": runs,
            "summary": summary}


def quality(args) -> dict:
    from benchmarks.quality import MAX_LENGTHS, N_LOCAL, build_model, train_and_evaluate
    from benchmarks.tasks import load_task
    from hf_contaccum.evaluation import RetrievalEvaluator
    from hf_contaccum.quickstart import default_encoder_path
    from hf_contaccum.retrieval.mining import mine_hard_negatives

    train, queries, corpus, qrels = load_task(args.task, 500, 3000)
    max_lengths = MAX_LENGTHS[args.task]
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(10, 100), show_progress=False,
                                   query_max_length=max_lengths[0], passage_max_length=max_lengths[1])
    pairs = train.select_columns(["query", "positive", "positive_id"])
    if len(pairs) > args.train_rows:  # a run reads steps x N_total rows: mining all of a large task's would only cost time
        pairs = pairs.shuffle(seed=0).select(range(args.train_rows))
    datasets = {}
    for name, options in VARIANTS.items():
        datasets[name] = pairs if options is None else mine_hard_negatives(
            pairs, default_encoder_path(), num_negatives=options["num_negatives"],
            **{k: v for k, v in options.items() if k != "num_negatives"}, show_progress=False)
        print(name, len(datasets[name]), "rows", flush=True)
    k = args.n_total // N_LOCAL
    runs = []
    for seed in range(args.seeds):
        for name, data in datasets.items():
            layout = (N_LOCAL, k, args.n_total, args.n_total, None, 1)
            run = train_and_evaluate(name, layout, seed, args.steps, evaluator, data, args.lr,
                                     f"/tmp/mining_run_{os.getpid()}", max_lengths)
            runs.append({key: run[key] for key in ("method", "seed", "ndcg@10", "recall@100")})
            print(json.dumps(runs[-1]), flush=True)
    table = {name: {"ndcg@10": statistics.mean(r["ndcg@10"] for r in runs if r["method"] == name),
                    "ndcg@10_sd": statistics.stdev([r["ndcg@10"] for r in runs if r["method"] == name])
                    if args.seeds > 1 else 0.0, "rows": len(datasets[name])} for name in datasets}
    return {"task": args.task, "train_rows": len(pairs), "n_total": args.n_total, "steps": args.steps, "lr": args.lr,
            "seeds": args.seeds,
            "pretrained": evaluator(build_model()),
            "runs": runs, "table": table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "quality"), default="speed")
    parser.add_argument("--synsets", default=os.path.join("..", "shared", "data", "wordnet", "synsets.jsonl.gz"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", default="wordnet")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train_rows", type=int, default=6000, help="training pairs kept (and mined against each other)")
    parser.add_argument("--n_total", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_speed_run(args.one, args.synsets, args.queries, 64)))
        return None
    result = speed(args) if args.part == "speed" else quality(args)
    name = f"mining/{args.part}{'' if args.part == 'speed' else '_' + args.task}.json"
    write_result(result, args.out, name)
    print(json.dumps(result.get("summary", result.get("table")), indent=1))
    return result


if __name__ == "__main__":
    main()

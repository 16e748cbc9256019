"""Staleness controls for banks larger than one optimizer step: an ablation on real data.

Same model, data, learning rate and steps as benchmarks/quality.py; N_local 8 x K, with
N_mem = N_total (the measured default) and N_mem = 4 x N_total plain, with a bank weight
of N_total / N_mem (the whole bank then weighs as much as one step's pairs), and with a
bank warm-up of 20 % of the steps (XBM), and with the whole bank encoded again before every
step (bank_refresh_steps=1, ANCE's refresh: no banked vector older than the step in progress) or every
4 steps (a quarter of the cost), against gradient accumulation, GradCache (exact large-batch gradients) and one full batch.
Mean +- sd over seeds of nDCG@10 and Recall@100.

    python -m benchmarks.staleness --task wordnet --n_total 32 --steps 100 --seeds 2
    python -m benchmarks.staleness ... --resume --seeds 3     # add a seed to a finished run
    bash benchmarks/gpu_staleness.sh                          # N_total 128, 3 tasks x 3 seeds on one GPU
    python -m benchmarks.staleness ... --methods contaccum-512-query-bank-128   # a diagnostic (see diagnostics())
    python -m benchmarks.staleness --encoder scratch --n_total 32 --steps 300 --lr 5e-4   # no pretraining at all

A maximum age is not a separate setting: entries join a FIFO bank every micro-step, so the
oldest is N_mem / N_total optimizer steps old, and a maximum age of A steps is exactly a
bank of min(N_mem, A x N_total) pairs, which the N_mem rows already measure.
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks.quality import (
    MAX_LENGTHS,
    N_LOCAL,
    build_model,
    load_runs,
    save,
    train_and_evaluate,
)
from benchmarks.tasks import load_task


def methods(n_total: int, factor: int, steps: int) -> dict:
    k, big = n_total // N_LOCAL, factor * n_total
    contaccum = (N_LOCAL, k, None, None, None, 1)
    return {
        "gradaccum": (N_LOCAL, k, 0, 0, None, 1),
        "gradcache": (n_total, 1, 0, 0, N_LOCAL, 1),
        "full": (n_total, 1, 0, 0, None, 1),  # one batch of N_total (the memory GradCache saves; dropout differs)
        f"contaccum-{n_total}": (N_LOCAL, k, n_total, n_total, None, 1),
        f"contaccum-{big}": (N_LOCAL, k, big, big, None, 1),
        # (bank_weight and bank_warmup_steps were measured here too, and retired in 0.2.0: CHANGELOG.md)
        # the whole bank encoded again before every step: a bank without staleness, for 2 x N_mem more forward
        # passes a step (the N_total 32 runs of 2026-11-26 used a first, benchmark-only version of the same
        # computation: blocks of 64 texts padded by the tokenizer instead of 256 cut from the kept tokens)
        f"contaccum-{big}-fresh": (*contaccum[:2], big, big, None, 1, {"bank_refresh_steps": 1}),
        # a quarter of the refresh's cost: banked vectors up to 4 steps old (last, so a run cut short skips it)
        f"contaccum-{big}-fresh-every-4": (*contaccum[:2], big, big, None, 1, {"bank_refresh_steps": 4}),
        # the bank moved by the encoder's common drift, measured on a probe of one micro-batch's pairs encoded
        # without dropout before every step (2 x N_local forward passes a step instead of the refresh's 2 x N_mem)
        f"contaccum-{n_total}-drift": (*contaccum[:2], n_total, n_total, None, 1, {"bank_drift_probe": N_LOCAL}),
        f"contaccum-{big}-drift": (*contaccum[:2], big, big, None, 1, {"bank_drift_probe": N_LOCAL}),
    }


def diagnostics(n_total: int, factor: int) -> dict:
    """Settings that explain rather than control (run only when named in --methods): the large passage bank's
    columns with only the newest N_total banked queries as rows, which tells what the large bank costs
    through its extra banked rows (stale queries that push the current passages) from what it costs through
    its extra columns (more negatives per query)."""
    k, big = n_total // N_LOCAL, factor * n_total
    unguarded = {"collapse_patience": 0}  # the whole loss curve, for benchmarks/collapse_guard.py to replay
    return {f"contaccum-{big}-query-bank-{n_total}": (N_LOCAL, k, n_total, big, None, 1),
            f"contaccum-{big}-query-bank-{n_total}-unguarded": (N_LOCAL, k, n_total, big, None, 1, unguarded),
            f"contaccum-{big}-passage-only-unguarded": (N_LOCAL, k, 0, big, None, 1, unguarded)}


def choose(n_total: int, factor: int, steps: int, names: str | None) -> dict:
    """The methods to run: every staleness control, or the comma-separated `names` (diagnostics included)."""
    chosen = methods(n_total, factor, steps)
    if names:
        known = {**chosen, **diagnostics(n_total, factor)}
        unknown = [m for m in names.split(",") if m not in known]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known at these settings: {', '.join(known)}")
        chosen = {m: known[m] for m in names.split(",")}
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(MAX_LENGTHS), default="wordnet")
    parser.add_argument("--n_total", type=int, default=32)
    parser.add_argument("--factor", type=int, default=4, help="the large bank is this many times N_total")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval_queries", type=int, default=500)
    parser.add_argument("--corpus_size", type=int, default=3000)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--output", default=None, help="default benchmarks/results/staleness/staleness_<task>.json")
    parser.add_argument("--first_seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all but the diagnostics, which run only when named)")
    parser.add_argument("--encoder", choices=("minilm", "scratch"), default="minilm",
                        help="scratch: a randomly initialised 4-layer encoder, no pretraining (quality.SCRATCH)")
    parser.add_argument("--merge", nargs="+", metavar=("OUTPUT", "PART"), default=None,
                        help="write OUTPUT from runs saved apart with the same settings (e.g. one process per seed)")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge[0], args.merge[1:])
    chosen = choose(args.n_total, args.factor, args.steps, args.methods)

    import torch

    from hf_contaccum.evaluation import RetrievalEvaluator

    path = args.output or f"benchmarks/results/staleness/staleness_{args.task}.json"
    max_lengths = MAX_LENGTHS[args.task]
    train, queries, corpus, qrels = load_task(args.task, args.eval_queries, args.corpus_size)
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(10, 100), query_max_length=max_lengths[0],
                                   passage_max_length=max_lengths[1], show_progress=False)
    config = {"task": args.task, "n_total": args.n_total, "bank": args.factor * args.n_total, "steps": args.steps,
              "seeds": args.seeds, "lr": args.lr, "eval_queries": len(evaluator.queries), "corpus": len(corpus)}
    if args.encoder != "minilm":  # (absent: the pretrained MiniLM, as every earlier result file)
        config["encoder"] = args.encoder
    results, before = load_runs(path, config) if args.resume and os.path.exists(path) else ([], None)
    if before is None:
        torch.manual_seed(args.first_seed)  # a scratch encoder's "before" is the first seed's initialisation
        before = evaluator(build_model(args.encoder))
    print("pretrained:", json.dumps(before), flush=True)
    done = {(r["method"], r["seed"]) for r in results}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method, layout in chosen.items():
            if (method, seed) in done:
                continue
            r = train_and_evaluate(method, layout, seed, args.steps, evaluator, train, args.lr,
                                   f"/tmp/staleness_run_{os.getpid()}", max_lengths, args.encoder)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("grad_norm_ratio", "loss")}), flush=True)
            save(path, config, before, results)
    print_table(save(path, config, before, results))


def merge(path: str, parts: list[str]) -> None:
    """One table from runs made apart (e.g. one process per seed on a GPU): the same settings but seeds."""
    config, before, results = None, None, []
    for part in parts:
        with open(part) as f:
            saved = json.load(f)
        settings = {k: v for k, v in saved.items() if k not in ("pretrained", "table", "runs", "seeds")}
        if config is not None and settings != {k: v for k, v in config.items() if k != "seeds"}:
            raise SystemExit(f"--merge: {part} was made with other settings than {parts[0]}")
        config, before = config or settings, before or saved["pretrained"]
        results += saved["runs"]
    config["seeds"] = len({r["seed"] for r in results})
    print_table(save(path, config, before, results))


def print_table(table) -> None:
    print(f"\n{'method':<34}{'nDCG@10':>16}{'Recall@100':>16}{'runs':>6}")
    for e in table:
        print(f"{e['method']:<34}{e['ndcg@10']:>9.4f} ± {e['ndcg@10_sd']:.4f}"
              f"{e['recall@100']:>9.4f} ± {e['recall@100_sd']:.4f}{e['runs']:>6}")


if __name__ == "__main__":
    main()

"""Staleness controls for banks larger than one optimizer step: an ablation on real data.

Same model, data, learning rate and steps as benchmarks/quality.py; N_local 8 x K, with
N_mem = N_total (the measured default) and N_mem = 4 x N_total plain, with a bank weight
of N_total / N_mem (the whole bank then weighs as much as one step's pairs), and with a
bank warm-up of 20 % of the steps (XBM), against gradient accumulation and GradCache
(exact large-batch gradients). Mean +- sd over seeds of nDCG@10 and Recall@100.

    python benchmarks/staleness.py --task wordnet --n_total 32 --steps 100 --seeds 2
    python benchmarks/staleness.py ... --resume --seeds 3     # add a seed to a finished run
    bash benchmarks/gpu_staleness.sh                          # N_total 128, 3 tasks x 3 seeds on one GPU

A maximum age is not a separate setting: entries join a FIFO bank every micro-step, so the
oldest is N_mem / N_total optimizer steps old, and a maximum age of A steps is exactly a
bank of min(N_mem, A x N_total) pairs, which the N_mem rows already measure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import (
    MAX_LENGTHS,
    N_LOCAL,
    encoder_path,
    load_runs,
    load_task,
    save,
    train_and_evaluate,
)


def fresh_bank_trainer():
    """An oracle, not a method: before every optimizer step the whole bank is re-encoded by the current encoder
    (no gradient, train mode as the current rows), so no banked vector is older than the step in progress: what
    a bank of this size would give without staleness, for N_mem x 2 more forward passes a step. If it does not
    beat N_mem = N_total either, staleness is not what costs the larger bank its quality."""
    from hf_contaccum import ContAccumTrainer
    from hf_contaccum.data import side_features

    class Trainer(ContAccumTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.slot_tokens = {}  # bank slot -> {"query": token ids, "passage": token ids} of the pair in it
            self.refreshed_at = -1

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training and torch.is_grad_enabled():
                if self.state.global_step != self.refreshed_at:  # the step's first micro-batch
                    self.refreshed_at = self.state.global_step
                    self._refresh()
                bank = self.memory_bank
                sides = {side: side_features(inputs, side) for side in ("query", "passage")}
                for i in range(inputs["query_input_ids"].shape[0]):  # this micro-batch's backward writes here
                    self.slot_tokens[(bank.ptr + i) % bank.capacity] = {
                        side: f["input_ids"][i][f["attention_mask"][i].bool()].tolist() for side, f in sides.items()}
            return super().compute_loss(model, inputs, *args, **kwargs)

        @torch.no_grad()
        def _refresh(self):
            bank, loss = self.memory_bank, self.contrastive_loss
            slots = sorted(s for s in self.slot_tokens if s < bank.fill)
            for start in range(0, len(slots), 64):
                batch = slots[start:start + 64]
                features = {side: self.processing_class.pad([{"input_ids": self.slot_tokens[s][side]} for s in batch],
                                                             return_tensors="pt") for side in ("query", "passage")}
                out = self.model(**{f"{side}_{k}": v.to(bank.queries.device) for side, f in features.items()
                                    for k, v in f.items()})
                index = torch.tensor(batch, device=bank.queries.device)
                bank.queries[index] = loss._prepare(out.query_embeddings).to(bank.queries.dtype)
                bank.passages[index] = loss._prepare(out.passage_embeddings).to(bank.passages.dtype)
            loss.bank_lse.stale = True  # the cache is rebuilt from the fresh vectors

    return Trainer


def methods(n_total: int, factor: int, steps: int) -> dict:
    k, big = n_total // N_LOCAL, factor * n_total
    contaccum = (N_LOCAL, k, None, None, None, 1)
    return {
        "gradaccum": (N_LOCAL, k, 0, 0, None, 1),
        "gradcache": (n_total, 1, 0, 0, N_LOCAL, 1),
        "full": (n_total, 1, 0, 0, None, 1),  # one batch of N_total (the memory GradCache saves; dropout differs)
        f"contaccum-{n_total}": (N_LOCAL, k, n_total, n_total, None, 1),
        f"contaccum-{big}": (N_LOCAL, k, big, big, None, 1),
        f"contaccum-{big}-weight-{n_total / big:g}": (*contaccum[:2], big, big, None, 1, {"bank_weight": n_total / big}),
        f"contaccum-{big}-warmup-{steps // 5}": (*contaccum[:2], big, big, None, 1, {"bank_warmup_steps": steps // 5}),
        # not run by default (--methods): an oracle that re-encodes the whole bank every step
        f"contaccum-{big}-fresh": (*contaccum[:2], big, big, None, 1, {"trainer_class": fresh_bank_trainer()}),
    }


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
    parser.add_argument("--output", default=None, help="default benchmarks/results/staleness_<task>.json")
    parser.add_argument("--first_seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--merge", nargs="+", metavar=("OUTPUT", "PART"), default=None,
                        help="write OUTPUT from runs saved apart with the same settings (e.g. one process per seed)")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge[0], args.merge[1:])

    from hf_contaccum import BiEncoder
    from hf_contaccum.evaluation import RetrievalEvaluator

    path = args.output or f"benchmarks/results/staleness_{args.task}.json"
    max_lengths = MAX_LENGTHS[args.task]
    train, queries, corpus, qrels = load_task(args.task, args.eval_queries, args.corpus_size)
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(10, 100), query_max_length=max_lengths[0],
                                   passage_max_length=max_lengths[1], show_progress=False)
    config = {"task": args.task, "n_total": args.n_total, "bank": args.factor * args.n_total, "steps": args.steps,
              "seeds": args.seeds, "lr": args.lr, "eval_queries": len(evaluator.queries), "corpus": len(corpus)}
    results, before = load_runs(path, config) if args.resume and os.path.exists(path) else ([], None)
    if before is None:
        before = evaluator(BiEncoder.from_encoder(encoder_path(), normalize=True))
    print("pretrained:", json.dumps(before), flush=True)
    done = {(r["method"], r["seed"]) for r in results}
    chosen = methods(args.n_total, args.factor, args.steps)
    if args.methods:
        chosen = {m: chosen[m] for m in args.methods.split(",")}
    else:
        chosen = {m: layout for m, layout in chosen.items() if not m.endswith("-fresh")}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method, layout in chosen.items():
            if (method, seed) in done:
                continue
            r = train_and_evaluate(method, layout, seed, args.steps, evaluator, train, args.lr,
                                   f"/tmp/staleness_run_{os.getpid()}",
                                   max_lengths)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "grad_norm_ratio"}), flush=True)
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

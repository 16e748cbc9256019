"""Bank overhead per optimizer step: ContAccum vs plain gradient accumulation, same model.

Both methods run through the Trainer's own training_step (the real code path: encode,
loss, backward, and the enqueue that the backward triggers) on the same micro-batches, interleaved round by round so that
drift in machine speed hits both alike. The ContAccum bank is pre-filled to N_mem so
every timed step pays for a full bank. Reports medians and the ratio; writes JSON.
With --refresh, a third method: the same bank encoded again before every step (bank_refresh_steps=1),
its slots holding real training pairs' tokens; with bank_refresh_steps=N the refresh costs 1/N of that.
With --drift_probe P, another: the same bank moved before every step by the drift of a probe of P pairs
(bank_drift_probe=P: 2 x P texts encoded without gradient, the bank shifted and its cache rebuilt).

    python -m benchmarks.bank_overhead --memory_bank_size 4096 --rounds 6
    python -m benchmarks.bank_overhead --memory_bank_size 512 --refresh --output benchmarks/results/performance/refresh_cost.json
    python -m benchmarks.bank_overhead --memory_bank_size 512 --refresh --drift_probe 8 --output benchmarks/results/performance/drift_probe_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder (default: offline all-MiniLM-L6-v2)")
    parser.add_argument("--n_local", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--memory_bank_size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    parser.add_argument("--query_max_length", type=int, default=64)
    parser.add_argument("--passage_max_length", type=int, default=32)
    parser.add_argument("--refresh", action="store_true", help="also time the bank refreshed before every step")
    parser.add_argument("--drift_probe", type=int, default=0, help="also time the bank moved by a probe of this many pairs")
    parser.add_argument("--output", default="benchmarks/results/performance/bank_overhead.json")
    args = parser.parse_args()

    from hf_contaccum import BiEncoder, ContAccumTrainer, ContAccumTrainingArguments
    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path

    torch.manual_seed(0)
    model = BiEncoder.from_encoder(args.model or default_encoder_path(), normalize=True)
    model.train()
    train, *_ = load_wordnet_sample()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    def make_trainer(bank, refresh=0, probe=0):
        targs = ContAccumTrainingArguments(
            output_dir="/tmp/bank_overhead", per_device_train_batch_size=args.n_local,
            gradient_accumulation_steps=args.k, memory_bank_size=bank, temperature=0.05, report_to="none",
            query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
            use_cpu=device == "cpu", disable_tqdm=True, bank_refresh_steps=refresh, bank_drift_probe=probe)
        return ContAccumTrainer(model=model, args=targs, train_dataset=train, processing_class=model.tokenizer)

    trainers = {"gradaccum": make_trainer(0), "contaccum": make_trainer(args.memory_bank_size)}
    if args.refresh:
        trainers["contaccum_refresh"] = make_trainer(args.memory_bank_size, refresh=1)
    if args.drift_probe:
        trainers["contaccum_drift_probe"] = make_trainer(args.memory_bank_size, probe=args.drift_probe)
    collate = trainers["gradaccum"].data_collator
    d = model.config.encoder_config["hidden_size"]
    for name in ("contaccum", "contaccum_refresh", "contaccum_drift_probe"):  # fill the bank: cost does not depend on the vectors' values
        if name in trainers and args.memory_bank_size:
            loss = trainers[name].contrastive_loss
            for first in range(len(train) - args.memory_bank_size, len(train), args.n_local):  # pairs never timed
                if name == "contaccum_refresh":  # what a refresh encodes: real pairs' tokens
                    batch = collate([train[j] for j in range(first, first + args.n_local)])
                    loss.keep_tokens({side: {key: batch[f"{side}_{key}"].to(device)[:args.n_local]
                                             for key in ("input_ids", "attention_mask")} for side in ("query", "passage")})
                fill = F.normalize(torch.randn(args.n_local, d, device=device), dim=-1)
                loss.enqueue(fill, fill, torch.arange(first, first + args.n_local, device=device) - 10**9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    per_step = args.n_local * args.k
    times = {name: [] for name in trainers}
    loss_seconds = {name: 0.0 for name in trainers}  # time inside ContAccumLoss (loss + enqueue)

    class TimedLoss:
        """Proxy that adds the time spent in the loss and in the enqueue (run by the backward) to loss_seconds."""

        def __init__(self, inner, name):
            self.inner, self.name = inner, name
            enqueue = inner.enqueue
            inner.enqueue = lambda *a, **k: self._timed(enqueue, *a, **k)  # what the backward hook calls

        def _timed(self, fn, *a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            loss_seconds[self.name] += time.perf_counter() - start
            return out

        def __call__(self, *a, **k):
            return self._timed(self.inner, *a, **k)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    for name, trainer in trainers.items():
        trainer.contrastive_loss = TimedLoss(trainer.contrastive_loss, name)

    def one_step(trainer, rows):
        trainer.current_gradient_accumulation_steps = args.k
        trainer.refreshed_at_step = None  # global_step stays 0 here: every timed step refreshes / moves the bank
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(args.k):
            batch = collate(rows[i * args.n_local:(i + 1) * args.n_local])
            trainer.training_step(model, {k: v.to(device) for k, v in batch.items()})
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    measured_loss = {name: [] for name in trainers}
    for r in range(args.rounds + 1):
        first = (r * per_step) % (len(train) - per_step)
        rows = [train[j] for j in range(first, first + per_step)]
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))  # alternate who goes first
        for name in order:
            loss_seconds[name] = 0.0
            t = one_step(trainers[name], rows)
            if r > 0:
                times[name].append(t)
                measured_loss[name].append(loss_seconds[name])
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in trainers if r > 0 and times[n]))
    med = {n: statistics.median(v) for n, v in times.items()}
    paired = {n: statistics.median(c / g for c, g in zip(times[n], times["gradaccum"])) for n in trainers}
    # the bank's own work: time in the loss + enqueue beyond what GradAccum's loss takes
    bank_work = statistics.median(c - g for c, g in zip(measured_loss["contaccum"], measured_loss["gradaccum"]))
    result = {
        "n_local": args.n_local, "k": args.k, "memory_bank_size": args.memory_bank_size, "device": device,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "query_max_length": args.query_max_length, "passage_max_length": args.passage_max_length,
        "seconds_per_step": times, "median_seconds_per_step": med,
        "ratio_of_medians": med["contaccum"] / med["gradaccum"],
        "median_paired_ratio": paired["contaccum"],
        "median_paired_ratio_to_gradaccum": paired,
        "loss_and_enqueue_seconds_per_step": measured_loss,
        "bank_work_seconds_per_step": bank_work,
        "bank_work_fraction_of_gradaccum_step": bank_work / med["gradaccum"],
    }
    print(json.dumps({k: result[k] for k in ("median_seconds_per_step", "ratio_of_medians",
                                             "median_paired_ratio_to_gradaccum",
                                             "bank_work_seconds_per_step", "bank_work_fraction_of_gradaccum_step")},
                     indent=1))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""GradCache mode: peak memory of one optimizer step against chunk size, and the time of
the second forward. Each configuration runs in its own process (so peak memory is its
own); the list is run twice in opposite orders and the medians kept.

    python -m benchmarks.gradcache_memory --batch 64 --chunks 64 32 16 8
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.harness import (
    device,
    load_model_and_pairs,
    median_of,
    memory_mark,
    peak_memory,
    run_grid,
    timed,
)


def worker(config):
    from hf_contaccum import ContAccumTrainer, ContAccumTrainingArguments

    batch_size, chunk, max_length, steps = config["batch"], config["chunk"], config["max_length"], 3
    model, rows = load_model_and_pairs(batch_size * (steps + 1), passage_suffix=True)
    args = ContAccumTrainingArguments(
        output_dir="/tmp/gc_bench", per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        memory_bank_size=0, temperature=0.05, gradcache_chunk_size=chunk or None, report_to="none",
        query_max_length=max_length, passage_max_length=max_length, use_cpu=device() == "cpu", disable_tqdm=True)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=rows, processing_class=model.tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)

    def step(i):
        batch = trainer.data_collator(rows[i * batch_size:(i + 1) * batch_size])
        trainer.training_step(model, {k: v.to(device()) for k, v in batch.items()})
        opt.step()
        opt.zero_grad()

    start_mb = memory_mark()
    times = [timed(lambda i=i: step(i)) for i in range(steps + 1)][1:]  # step 0: warm-up, optimizer state
    peak = peak_memory()
    print(json.dumps({"chunk": chunk, "seconds_per_step": sorted(times)[len(times) // 2], "peak_mb": peak,
                      "peak_minus_start_mb": peak - start_mb, "device": device()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="local batch (queries per step)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 32, 16, 8],
                        help="GradCache chunk sizes; the plain full-batch step always runs too")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/performance/gradcache_memory.json")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(json.loads(args.config))
    configs = [{"batch": args.batch, "chunk": c, "max_length": args.max_length} for c in [0] + args.chunks]
    runs = run_grid(os.path.abspath(__file__), configs, args.repeats)
    results = [runs[json.dumps(c, sort_keys=True)] for c in configs]
    plain = median_of(results[0], "seconds_per_step")
    summary = [{"chunk": c["chunk"] or "no GradCache", "seconds_per_step": median_of(r, "seconds_per_step"),
                "time_ratio_vs_plain": median_of(r, "seconds_per_step") / plain,
                "peak_mb": median_of(r, "peak_mb"), "peak_minus_start_mb": median_of(r, "peak_minus_start_mb")}
               for c, r in zip(configs, results)]
    for row in summary:
        print(row)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"batch": args.batch, "max_length": args.max_length, "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

"""GradCache mode: peak memory of one optimizer step against chunk size, and the time of
the second forward. Each configuration runs in its own process (so peak memory is its
own); the list is run twice in opposite orders and the medians kept.

    python benchmarks/gradcache_memory.py --batch 64 --chunks 64 32 16 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb():
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def worker(args):
    import torch

    from hf_contaccum import BiEncoder, ContAccumTrainer, ContAccumTrainingArguments
    from hf_contaccum.quickstart import default_encoder_path
    from hf_contaccum.sample_data import load_wordnet_sample

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BiEncoder.from_encoder(default_encoder_path(), normalize=True).to(device)
    train, *_ = load_wordnet_sample()
    # longer texts than the quick start: definitions + examples as passages, so activations dominate
    chunk = None if args.chunk == 0 else args.chunk
    targs = ContAccumTrainingArguments(
        output_dir="/tmp/gc_bench", per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        memory_bank_size=0, temperature=0.05, gradcache_chunk_size=chunk, report_to="none",
        query_max_length=args.max_length, passage_max_length=args.max_length, use_cpu=device == "cpu",
        disable_tqdm=True)
    trainer = ContAccumTrainer(model=model, args=targs, train_dataset=train, processing_class=model.tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    collate = trainer.data_collator
    rows = [dict(r, positive=r["positive"] + " : " + r["query"] * 3) for r in train.select(range(args.batch * 4))]
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _rss_mb()
    for step in range(4):
        batch = {k: v.to(device) for k, v in collate(rows[step * args.batch:(step + 1) * args.batch]).items()}
        start = time.perf_counter()
        trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 is warm-up (and allocates the optimizer state)
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"chunk": args.chunk, "seconds_per_step": statistics.median(times), "peak_mb": peak,
                      "peak_minus_start_mb": peak - base, "device": device}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="local batch (queries per step)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 32, 16, 8],
                        help="GradCache chunk sizes; the plain full-batch step always runs too")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default="benchmarks/results/gradcache_memory.json")
    args = parser.parse_args()
    if args.chunk is not None:
        return worker(args)
    configs = [0] + args.chunks  # 0 = no GradCache
    runs = {c: [] for c in configs}
    for order in (configs, configs[::-1]):
        for c in order:
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--max_length", str(args.max_length),
                   "--chunk", str(c)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[c].append(json.loads(out))
            print(out, flush=True)
    plain = statistics.median(r["seconds_per_step"] for r in runs[0])
    summary = []
    for c in configs:
        t = statistics.median(r["seconds_per_step"] for r in runs[c])
        summary.append({"chunk": c or "no GradCache", "seconds_per_step": t, "time_ratio_vs_plain": t / plain,
                        "peak_mb": statistics.median(r["peak_mb"] for r in runs[c]),
                        "peak_minus_start_mb": statistics.median(r["peak_minus_start_mb"] for r in runs[c])})
    for row in summary:
        print(row)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"batch": args.batch, "max_length": args.max_length, "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time per optimizer step and peak memory against the total batch N_total, for every way
of training a retriever with a large batch on small memory, in one tool:

  full          one forward of the whole N_total batch (the memory-hungry reference)
  gradaccum     gradient accumulation, N_local 8 x K
  contaccum-M   ContAccum, N_local 8 x K, bank of M pairs (pre-filled, so every step pays for a full bank)
  gradcache     GradCache over the whole N_total batch in chunks of 8
  hybrid        GradCache chunks of 8 over N_total AND a bank of 1024 pairs
  st-cmnrl      sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache), mini-batch 8

All use the offline all-MiniLM-L6-v2 and real WordNet (definition, lemmas) pairs. Each
(method, N_total) runs in its own process (peak memory is its own); the grid runs
`--repeats` times in alternating order and medians are kept. Writes raw JSON and a PNG.

    python -m benchmarks.speed_memory --quick     # N_total 32, 64, 128; under 10 min on 2 CPU cores
    python -m benchmarks.speed_memory             # N_total 32 ... 512, 2 repeats (long on a CPU)
    python -m benchmarks.speed_memory --setting gpu-paper [options]   # bert-base, 256-token passages,
                                                  # through trainer.train(): see benchmarks/gpu_paper.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

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

N_LOCAL = 8
METHODS = ["full", "gradaccum", "contaccum-128", "contaccum-1024", "contaccum-8192", "gradcache", "hybrid", "st-cmnrl"]


def _layout(method, n_total):
    """(per-device batch, accumulation steps, bank size, GradCache chunk)."""
    if method == "full":
        return n_total, 1, 0, None
    if method == "gradaccum":
        return N_LOCAL, n_total // N_LOCAL, 0, None
    if method.startswith("contaccum-"):
        return N_LOCAL, n_total // N_LOCAL, int(method.split("-")[1]), None
    if method == "gradcache":
        return n_total, 1, 0, N_LOCAL
    if method == "hybrid":
        return n_total, 1, 1024, N_LOCAL
    raise ValueError(method)


def _contaccum_steps(model, rows, method, n_total, steps):
    import torch.nn.functional as F

    from hf_contaccum import ContAccumTrainer, ContAccumTrainingArguments

    per_device, k, bank, chunk = _layout(method, n_total)
    args = ContAccumTrainingArguments(
        output_dir="/tmp/speed_memory", per_device_train_batch_size=per_device, gradient_accumulation_steps=k,
        memory_bank_size=bank, gradcache_chunk_size=chunk, temperature=0.05, report_to="none",
        query_max_length=64, passage_max_length=32, use_cpu=device() == "cpu", disable_tqdm=True)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=rows, processing_class=model.tokenizer)
    trainer.current_gradient_accumulation_steps = k
    if bank:
        d = model.config.encoder_config["hidden_size"]
        fill = F.normalize(torch.randn(bank, d, device=device()), dim=-1)
        trainer.contrastive_loss.enqueue(fill, fill, torch.arange(bank, device=device()) - 10**9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    collate = trainer.data_collator

    def step(i):
        step_rows = rows[i * n_total:(i + 1) * n_total]
        for j in range(k):
            batch = collate(step_rows[j * per_device:(j + 1) * per_device])
            trainer.training_step(model, {key: v.to(device()) for key, v in batch.items()})
        opt.step()
        opt.zero_grad()

    return step


def _st_cmnrl_steps(rows, n_total):
    from sentence_transformers import SentenceTransformer, losses

    from hf_contaccum.quickstart import default_encoder_path

    model = SentenceTransformer(str(default_encoder_path()), device=device())
    model.max_seq_length = 64
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=N_LOCAL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    model.train()

    def features(texts):
        return {k: v.to(device()) if torch.is_tensor(v) else v for k, v in model.tokenize(texts).items()}

    def step(i):
        step_rows = rows[i * n_total:(i + 1) * n_total]
        loss = loss_fn([features([r["query"] for r in step_rows]), features([r["positive"] for r in step_rows])], None)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def worker(config):
    method, n_total, steps = config["method"], config["n_total"], config["steps"]
    model, rows = load_model_and_pairs(n_total * (steps + 1))
    if method == "st-cmnrl":
        del model
        step = _st_cmnrl_steps(rows, n_total)
    else:
        step = _contaccum_steps(model, rows, method, n_total, steps)
    start_mb = memory_mark()
    times = [timed(lambda i=i: step(i)) for i in range(steps + 1)][1:]  # first step: warm-up
    peak = peak_memory()
    print(json.dumps({"method": method, "n_total": n_total, "seconds_per_step": sorted(times)[len(times) // 2],
                      "all_seconds": times, "peak_mb": peak, "peak_minus_start_mb": peak - start_mb,
                      "device": device()}))


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = [(s["n_total"], s["seconds_per_step"], s["peak_minus_start_mb"]) for s in summary
               if s["method"] == method and s["seconds_per_step"] is not None]
        if pts:
            xs, ts, ms = zip(*pts)
            axes[0].plot(xs, ts, marker="o", label=method)
            axes[1].plot(xs, ms, marker="o", label=method)
    for ax, label in zip(axes, ("seconds per optimizer step", "peak memory above start (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N_total (pairs per optimizer step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"all-MiniLM-L6-v2, N_local {N_LOCAL}, {summary[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    if sys.argv[1:3] == ["--setting", "gpu-paper"]:  # the GPU throughput issue's setting: its own script
        import gpu_paper

        return gpu_paper.main(sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N_total 32/64/128, one repeat, 2 timed steps")
    parser.add_argument("--n_total", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (after one warm-up)")
    parser.add_argument("--output", default="benchmarks/results/speed_memory/speed_memory")
    parser.add_argument("--summarize", nargs="+", default=None,
                        help="only recompute the summary and plot of a results JSON; several are merged into "
                             "OUTPUT.json (e.g. a quick run and a run at N_total 256 512)")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(json.loads(args.config))
    if args.summarize:
        return summarize(args.summarize[0] if len(args.summarize) == 1 else merge(args.summarize, args.output))
    n_totals = args.n_total or ([32, 64, 128] if args.quick else [32, 64, 128, 256, 512])
    repeats = args.repeats or (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 3)
    configs = [{"method": m, "n_total": n, "steps": steps} for n in n_totals for m in args.methods]
    runs = run_grid(os.path.abspath(__file__), configs, repeats)
    suffix = "_quick" if args.quick else ""
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + suffix + ".json", "w") as f:
        json.dump({"n_local": N_LOCAL, "repeats": repeats, "steps": steps, "configs": configs, "runs": runs}, f,
                  indent=1)
    summarize(args.output + suffix + ".json")


def merge(paths, output):
    """One results file from several runs of the grid (configs in order of N_total, then method)."""
    merged = {"n_local": N_LOCAL, "merged_from": paths, "configs": [], "runs": {}}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        merged["configs"] += data["configs"]
        merged["runs"].update(data["runs"])
        merged.setdefault("repeats_steps", {})[path] = [data["repeats"], data["steps"]]
    merged["configs"].sort(key=lambda c: (c["n_total"], METHODS.index(c["method"])))
    with open(output + ".json", "w") as f:
        json.dump(merged, f, indent=1)
    return output + ".json"


def summarize(path):
    """Medians over every timed step of every repeat, ratios to GradAccum; table, JSON and PNG."""
    with open(path) as f:
        data = json.load(f)
    summary = []
    for config in data.get("configs") or [json.loads(key) for key in data["runs"]]:
        results = data["runs"][json.dumps(config, sort_keys=True)]
        pooled = [t for r in results for t in r["all_seconds"]]
        summary.append({"method": config["method"], "n_total": config["n_total"],
                        "seconds_per_step": statistics.median(pooled) if pooled else None,
                        "timed_steps": len(pooled), "peak_mb": median_of(results, "peak_mb"),
                        "peak_minus_start_mb": median_of(results, "peak_minus_start_mb"),
                        "device": results[0]["device"] if results else device()})
    base = {s["n_total"]: s for s in summary if s["method"] == "gradaccum"}
    for s in summary:
        b = base.get(s["n_total"])
        if b and s["seconds_per_step"] and b["seconds_per_step"]:
            s["time_vs_gradaccum"] = s["seconds_per_step"] / b["seconds_per_step"]
    print(f"{'method':<16}{'N_total':>8}{'s/step':>9}{'x GradAccum':>13}{'peak MiB':>10}")
    for s in summary:
        print(f"{s['method']:<16}{s['n_total']:>8}{s['seconds_per_step'] or float('nan'):>9.3f}"
              f"{s.get('time_vs_gradaccum', float('nan')):>13.3f}{s['peak_minus_start_mb'] or float('nan'):>10.0f}")
    data["summary"] = summary
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    plot(summary, path.replace(".json", ".png"))


if __name__ == "__main__":
    main()

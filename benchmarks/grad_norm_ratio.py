"""Does the logged GradNormRatio tell a passage-only bank (pre-batch negatives) from the dual bank?

Short real runs (WordNet or Debian, offline MiniLM, N_total 128 = 8 x 16, lr 1e-4, cosine with
tau 0.05 on the encoder's raw, unnormalised vectors, as the held-out task that exposed the
problem) of gradient accumulation, pre-batch negatives and ContAccum, logging at every step:

  grad_norm_ratio         passage-side over query-side gradient norm at the vectors the
                          similarity compares (unit vectors for cosine): what the library logs
  grad_norm_ratio_raw     the same at the encoder's raw output vectors (what it logged before)
  grad_norm_ratio_towers  passage tower over query tower parameter-gradient norm (the paper's
                          definition; separate towers only)

    python -m benchmarks.grad_norm_ratio --task wordnet      # ~10 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings

import torch

from benchmarks.harness import device
from benchmarks.quality import MAX_LENGTHS
from benchmarks.tasks import load_task

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {  # name: (query bank, passage bank)
    "gradaccum": (0, 0),
    "prebatch-1024": (0, 1024),
    "contaccum-1024": (1024, 1024),
    "prebatch-128": (0, 128),
    "contaccum-128": (128, 128),
}
KEYS = ("grad_norm_ratio", "grad_norm_ratio_raw", "grad_norm_ratio_towers")


def run(task_data, method, shared, steps, lr, max_lengths, seed):
    from hf_contaccum import BiEncoder, ContAccumTrainer, ContAccumTrainingArguments
    from hf_contaccum.quickstart import default_encoder_path

    train = task_data[0]
    qbank, pbank = METHODS[method]
    torch.manual_seed(seed)
    model = BiEncoder.from_encoder(default_encoder_path(), shared=shared, normalize=False)
    args = ContAccumTrainingArguments(
        output_dir="/tmp/grad_norm_ratio", per_device_train_batch_size=8, gradient_accumulation_steps=16,
        max_steps=steps, learning_rate=lr, warmup_steps=0.1, max_grad_norm=2.0, seed=seed, data_seed=seed,
        memory_bank_size=pbank, query_memory_bank_size=qbank, similarity="cos", temperature=0.05,
        query_max_length=max_lengths[0], passage_max_length=max_lengths[1], logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device() == "cpu", disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pre-batch warns about the imbalance, by design
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=train, processing_class=model.tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"method": method, "shared": shared, "loss": [h["loss"] for h in logs],
            **{k: [h[k] for h in logs if k in h] for k in KEYS}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(MAX_LENGTHS), default="wordnet")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--separate_towers", nargs="*", default=["prebatch-1024", "contaccum-1024"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    output = args.output or os.path.join(HERE, "results", "grad_norm_ratio", f"grad_norm_ratio_{args.task}")
    data = load_task(args.task, 50, 200)
    runs = []
    plan = [(m, True) for m in METHODS] + [(m, False) for m in args.separate_towers]
    for method, shared in plan:
        result = run(data, method, shared, args.steps, args.lr, MAX_LENGTHS[args.task], args.seed)
        runs.append(result)
        summary = {k: round(statistics.mean(result[k][len(result[k]) // 2:]), 3) for k in KEYS if result[k]}
        print(json.dumps({"method": method, "shared": shared, "second_half_means": summary}), flush=True)
    with open(output + ".json", "w") as f:
        json.dump({"task": args.task, "steps": args.steps, "lr": args.lr, "seed": args.seed, "runs": runs}, f,
                  indent=1)
    plot(runs, output + ".png", args.task)


def plot(runs, path, task):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("grad_norm_ratio", "at the compared (unit) vectors: logged now", True),
              ("grad_norm_ratio_raw", "at the raw encoder outputs: logged before", True),
              ("grad_norm_ratio_towers", "tower parameter gradients (separate towers)", False)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, title, shared) in zip(axes, panels):
        for r in runs:
            if r["shared"] == shared and r[key]:
                ax.plot(range(1, len(r[key]) + 1), r[key], label=r["method"],
                        linestyle="--" if r["method"].startswith("prebatch") else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.axhline(1.0, color="#bbb", linewidth=0.8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("GradNormRatio (passage / query)")
    fig.suptitle(f"{task}: MiniLM-L6, N_total 128, cosine on raw vectors, tau 0.05", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

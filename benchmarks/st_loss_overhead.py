"""hf_contaccum's sentence-transformers ContAccumLoss against sentence-transformers' own losses,
per optimizer step of SentenceTransformerTrainer, side by side in one process.

Same model (the offline all-MiniLM-L6-v2), same batches (WordNet pairs in a fixed order),
same trainer settings; only the loss differs. Methods run interleaved round by round
(the order rotates) so that drift in machine speed hits all alike. The banks are
pre-filled, so every timed step pays for a full bank. Reports the median seconds per
step and the median of per-round ratios to MultipleNegativesRankingLoss; writes JSON and
a plot.

    python -m benchmarks.st_loss_overhead --rounds 7          # ~10 min on 2 CPU cores
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

HERE = os.path.dirname(os.path.abspath(__file__))


def build_losses(model, bank, chunk):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from hf_contaccum.sentence_transformers import (
        ContAccumMultipleNegativesRankingLoss as ContAccumLoss,
    )

    return {
        "MNRL": MultipleNegativesRankingLoss(model),
        "ContAccum N_mem 0": ContAccumLoss(model, memory_bank_size=0),
        f"ContAccum N_mem {bank}": ContAccumLoss(model, memory_bank_size=bank),
        f"CachedMNRL mini-batch {chunk}": CachedMultipleNegativesRankingLoss(model, mini_batch_size=chunk),
        f"ContAccum N_mem {bank} + GradCache {chunk}": ContAccumLoss(model, memory_bank_size=bank,
                                                                      mini_batch_size=chunk),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32, help="pairs per micro-batch")
    parser.add_argument("--k", type=int, default=4, help="accumulation steps")
    parser.add_argument("--memory_bank_size", type=int, default=4096)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "st_loss", "st_loss_overhead"))
    parser.add_argument("--plot_only", action="store_true", help="redraw the plot from the output's JSON")
    args = parser.parse_args()
    if args.plot_only:
        with open(args.output + ".json") as f:
            plot(json.load(f), args.output + ".png")
        return

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback

    from benchmarks.harness import write_result
    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = SentenceTransformer(str(default_encoder_path()))
    model[0].max_seq_length = 32
    train, *_ = load_wordnet_sample(max_train=args.batch_size * args.k * (args.steps + 1))
    train = train.rename_column("query", "anchor").remove_columns("positive_id")
    losses = build_losses(model, args.memory_bank_size, args.mini_batch_size)
    dim = model.encode(["dimension probe"]).shape[1]  # (the method that says it was renamed in v6)
    for name, loss in losses.items():  # fill the banks: the cost does not depend on the vectors' values
        if hasattr(loss, "bank_for") and loss.bank_for(dim).memory_bank_size:
            fill = F.normalize(torch.randn(args.memory_bank_size, dim, device=model.device), dim=-1)
            loss.bank_for(dim).enqueue(fill, fill, torch.arange(args.memory_bank_size, device=model.device) - 10**9)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    def sequential(dataset, batch_size, drop_last, *a, **k):
        return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last)

    def run(name):
        timer = StepTimer()
        targs = Arguments(output_dir="/tmp/st_loss_overhead", max_steps=args.steps + 1,
                          per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.k,
                          learning_rate=1e-9, report_to="none", save_strategy="no", logging_strategy="no",
                          disable_tqdm=True, batch_sampler=sequential, use_cpu=not torch.cuda.is_available())
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=train, loss=losses[name],
                                             callbacks=[timer])
        trainer.train()
        return timer.times[1:]  # the first step warms up

    loss_only = loss_only_ms(losses, args.batch_size, dim, model.device)
    print("loss only (ms per micro-batch, forward + backward on fixed embeddings):", json.dumps(loss_only))
    micro_step = micro_step_ms(model, losses, train, args.batch_size)
    print("micro-step (ms: embed + loss + backward, interleaved):", json.dumps(micro_step))
    names = list(losses)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(statistics.median(run(name)))
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    median = {n: statistics.median(v) for n, v in times.items()}
    paired = {n: statistics.median(a / b for a, b in zip(times[n], times["MNRL"])) for n in names}
    result = {"batch_size": args.batch_size, "k": args.k, "memory_bank_size": args.memory_bank_size,
              "mini_batch_size": args.mini_batch_size, "max_seq_length": 32, "steps_per_run": args.steps,
              "rounds": args.rounds, "device": str(model.device), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "seconds_per_step": times,
              "median_seconds_per_step": median, "median_paired_ratio_to_mnrl": paired,
              "loss_only_ms_per_micro_batch": loss_only, "micro_step_ms": micro_step}
    print(json.dumps({"median_seconds_per_step": median, "median_paired_ratio_to_mnrl": paired}, indent=1))
    write_result(result, args.output + ".json", "st_loss/st_loss_overhead.json")  # with the run's provenance
    plot(result, args.output + ".png")


def loss_only_ms(losses, batch_size, dim, device, repeats=200):
    """The losses' own cost, without the encoder: forward + backward of MNRL and of ContAccumLoss (full
    bank; the backward enqueues) on the same fixed embeddings, median milliseconds per micro-batch."""
    anchors, positives = (torch.randn(batch_size, dim, device=device, requires_grad=True) for _ in range(2))
    keys = torch.arange(batch_size, device=device)
    calls = {
        "MNRL": lambda: losses["MNRL"].compute_loss_from_embeddings([anchors, positives], None),
        "ContAccum N_mem 0": lambda: losses["ContAccum N_mem 0"].bank_for(dim)(anchors, positives, keys),
    }
    banked = next(n for n in losses if n.startswith("ContAccum N_mem") and n != "ContAccum N_mem 0" and "+" not in n)
    calls[banked] = lambda: losses[banked].bank_for(dim)(anchors, positives, keys)
    result = {}
    for name, call in calls.items():
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call().backward()
            samples.append((time.perf_counter() - start) * 1000)
        result[name] = statistics.median(samples)
    return result


def micro_step_ms(model, losses, train, batch_size, repeats=30):
    """One micro-batch end to end (embed both columns, loss, backward), every loss on the same
    tokenised batch, interleaved `repeats` times: the finest side-by-side comparison (median ms)."""
    texts = train.select(range(batch_size))
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # renamed in sentence-transformers 6.2
    features = [tokenize(texts["anchor"]), tokenize(texts["positive"])]
    model.train()
    samples = {name: [] for name in losses}
    for r in range(repeats):
        names = list(losses) if r % 2 == 0 else list(losses)[::-1]
        for name in names:
            start = time.perf_counter()
            losses[name]([dict(f) for f in features], None).backward()
            samples[name].append((time.perf_counter() - start) * 1000)
    model.zero_grad()
    return {name: statistics.median(v) for name, v in samples.items()}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["median_seconds_per_step"])
    panels = [("seconds per optimizer step (median, whole trainer step)", result["median_seconds_per_step"],
               result["median_paired_ratio_to_mnrl"])]
    if "micro_step_ms" in result:
        micro = result["micro_step_ms"]
        panels.append(("ms per micro-batch (embed + loss + backward, interleaved)", micro,
                       {n: micro[n] / micro["MNRL"] for n in names}))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 3.4 * len(panels)))
    for ax, (label, values, ratios) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        bars = ax.barh(names[::-1], [values[n] for n in names[::-1]],
                       color=["#888" if "MNRL" in n else "#2a7" for n in names[::-1]])
        for bar, name in zip(bars, names[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratios[name]:.3f}x MNRL", va="center")
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values.values()) * 1.35)
    fig.suptitle(f"SentenceTransformerTrainer, MiniLM-L6, {result['batch_size']} x {result['k']} pairs per step, "
                 f"N_mem {result['memory_bank_size']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

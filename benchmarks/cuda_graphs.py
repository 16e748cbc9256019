"""CUDA graphs with gradient accumulation: are the accumulated gradients right, and what would they save?

The paper setting's micro-step is launch-bound on a GPU (an H200 profile: the GPU busy 10 %, ~2,500 kernel launches
per micro-step). torch.compile(mode="reduce-overhead") replays each compiled graph as one CUDA graph, but PyTorch's
CUDA graph trees own the memory of a compiled backward's outputs and autograd installs the first micro-batch's
gradients as the .grad tensors themselves, so a later micro-batch's replay can overwrite them (pytorch/pytorch#96693,
#169545). ContAccumTrainingArguments therefore refuses CUDA graphs with several backward passes per step. This script
measures, outside the Trainer (a loop of its own: BiEncoder + ContAccumLoss), what it would take to lift that:

  correctness  a tiny BERT in fp32 without dropout, 3 optimizer steps of K = 4 micro-batches (bank of 32, one hard
               negative): every parameter against eager mode, for compile without CUDA graphs, CUDA graphs with the
               gradients set to None after each step (what the Trainer's zero_grad does), and CUDA graphs with the
               gradient buffers allocated once and zeroed in place (PyTorch's advice when it detects the overwrite)
  speed        (--speed) bert-base from a config, bf16 autocast, N_local 8, 32-token queries and
               256-token passages and hard negatives (fixed shapes), K = 8, a full bank of 8,192: s/step of eager,
               compile, and CUDA graphs with kept gradient buffers

On a CPU inductor runs without CUDA graphs, so every variant is plain compile: a smoke run (--speed --tiny there).
Reading it: if "graphs, grads kept" is as close to eager as "compile" is (the parameters move ~1e-1, compile differs
~1e-6) and faster than compile, the Trainer could allow CUDA graphs with accumulation by keeping the buffers
(zeroed .grad for every trainable parameter before the first backward, zero_grad(set_to_none=False) after each step).

    python -m benchmarks.cuda_graphs                    # correctness (~1 min on a GPU, compilation included)
    python -m benchmarks.cuda_graphs --speed --out benchmarks/results/gpu/cuda_graphs_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

from benchmarks import gpu_paper
from hf_contaccum import BiEncoder, ContAccumLoss

VARIANTS = {"eager": (False, None, False), "compile": (True, None, False),
            "graphs, grads set to None": (True, "reduce-overhead", False),
            "graphs, grads kept": (True, "reduce-overhead", True)}


def micro_batches(tokenizer, rows, n_local, query_tokens, passage_tokens, device):
    """Tokenised micro-batches of fixed shapes (padding to the maximum length): every replay has the same shapes."""
    def tok(texts, length):
        return tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")

    batches = []
    for start in range(0, len(rows) - n_local + 1, n_local):
        part = rows[start:start + n_local]
        q = tok([r["query"] for r in part], query_tokens)
        p = tok([r["positive"] for r in part] + [r["negative"] for r in part], passage_tokens)
        batches.append({"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
                        "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]})
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def train(model, batches, k, steps, compiled, mode, keep_grads, bank, autocast, lr=1e-3, timed=False):
    """steps optimizer steps of k micro-batches; returns (step times, final loss)."""
    device = next(model.parameters()).device
    forward = torch.compile(model, mode=mode) if compiled else model
    loss_fn = ContAccumLoss(bank, temperature=0.05, similarity="dot", bank_hard_negatives=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if keep_grads:  # the buffers exist before any backward runs, outside every CUDA graph, and are never freed
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    if bank > 64:  # a full bank from the first step, as in gpu_paper
        gpu_paper.prefill_bank(loss_fn, model.config.encoder_config["hidden_size"], device)
    times, micro = [], 0
    for _ in range(steps):
        if timed and device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(k):
            batch = batches[micro % len(batches)]
            micro += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = forward(**batch)
            n = out.query_embeddings.shape[0]
            passages = out.passage_embeddings
            loss = loss_fn(out.query_embeddings, passages[:n], hard_negatives=passages[n:, None])
            (loss / k).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)
        if timed and device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, loss.item()


def correctness(device) -> dict:
    path = gpu_paper.encoder_folder(True)
    rows = gpu_paper.make_rows(64, 32)
    results, reference = {}, None
    for name, (compiled, mode, keep) in VARIANTS.items():
        torch.manual_seed(0)
        model = BiEncoder.from_encoder(path, shared=True, pooling="mean").to(device).eval()  # eval: no dropout
        initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        batches = micro_batches(model.tokenizer, rows, 4, 16, 32, device)
        torch._dynamo.reset()
        try:
            _, loss = train(model, batches, k=4, steps=3, compiled=compiled, mode=mode, keep_grads=keep, bank=32,
                            autocast=False)
        except RuntimeError as error:  # what CUDA graph trees raise when they detect an overwritten output
            results[name] = {"error": f"{type(error).__name__}: {error}"[:600],
                             "where": traceback.format_exc().splitlines()[-3][:200]}
            continue
        params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        if reference is None:
            reference = params
        diff = max((params[n] - reference[n]).abs().max().item() for n in params)
        moved = max((params[n] - initial[n]).abs().max().item() for n in params)  # the scale a wrong gradient shows at
        results[name] = {"max_param_diff_vs_eager": diff, "max_param_change": moved, "final_loss": loss}
        print(f"{name:28s} max |param - eager| {diff:.3e} (moved {moved:.3e})  loss {loss:.6f}", flush=True)
    return results


def speed(device, steps: int, warmup: int, save, tiny: bool = False) -> dict:
    """save(results) after each variant: a run cut short by its time limit keeps what it measured.
    tiny: a tiny BERT and 32-token passages (a smoke run on a CPU, where every variant is eager or plain compile)."""
    path = gpu_paper.encoder_folder(tiny)
    passage_tokens = 32 if tiny else gpu_paper.PASSAGE_TOKENS
    rows = gpu_paper.make_rows(8 * 8 * 2, passage_tokens)
    cuda = device.type == "cuda"
    results = {}
    for name in ("eager", "compile", "graphs, grads kept"):
        compiled, mode, keep = VARIANTS[name]
        torch.manual_seed(0)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model = BiEncoder.from_encoder(path, shared=True, pooling="mean", normalize=True).to(device).train()
        batches = micro_batches(model.tokenizer, rows, gpu_paper.N_LOCAL, gpu_paper.QUERY_TOKENS,
                                passage_tokens, device)
        try:
            times, _ = train(model, batches, k=8, steps=warmup + steps, compiled=compiled, mode=mode, keep_grads=keep,
                             bank=8192, autocast=cuda, lr=1e-5, timed=True)
        except RuntimeError as error:  # out of memory, or a CUDA graph tree refusing
            results[name] = {"error": f"{type(error).__name__}: {error}"[:600]}
            continue
        results[name] = {"seconds_per_step": statistics.median(times[warmup:]), "step_times": times,
                         "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
        base = results.get("eager", {}).get("seconds_per_step")
        if base:
            results[name]["ratio_to_eager"] = results[name]["seconds_per_step"] / base
        print(f"{name:28s} {results[name]['seconds_per_step']:.3f} s/step (N_total 64)", flush=True)
        save(results)
        del model, batches
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="also time bert-base (on a GPU: on a CPU use --tiny)")
    parser.add_argument("--tiny", action="store_true", help="--speed with a tiny BERT: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, graph recording)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"device": gpu_paper.device_name(), "torch": torch.__version__}

    def save(key, value):
        report[key] = value
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    save("correctness", correctness(device))
    if args.speed:
        speed(device, args.steps, args.warmup, lambda results: save("speed", results), args.tiny)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

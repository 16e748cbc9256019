"""Ops dispatched per micro-step, by who dispatched them: how much of a launch-bound GPU micro-step is ours.

On a GPU the paper setting's micro-step is launch-bound (an H200 profile: the GPU busy 10 %, ~2,500 kernel
launches per micro-step), so the ops the library adds cost host time as the encoder's do.
This counts, on any device, the aten ops one optimizer step dispatches (a TorchDispatchMode, below autograd: what
would run as kernels) through the Trainer's own loop (gpu_paper.run_method), per micro-step (GradCache: per chunk
of 8 pairs), split by the innermost Python frame outside torch: the encoder's forward (transformers' code other
than its Trainer: the model, its attention and masks), each module of this library (its backward hooks and the
enqueue at the end of the backward included), the autograd engine's backward kernels (everyone's), and the rest
(the optimizer, the Trainer). Views and allocations, which launch nothing, are counted apart. A count, not a time:
the same on every machine for one torch version.

    python -m benchmarks.launch_count                          # tiny BERT, N_total 64
    python -m benchmarks.launch_count --bert_base --n_total 64 --out benchmarks/results/performance/launch_count_bert_base.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

import hf_contaccum
from benchmarks import gpu_paper

NO_KERNEL = {"empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense"}  # allocate, or read
# the package's own folder, not any path with "hf_contaccum" in it: a checkout cloned as hf_contaccum/ holds .ci-venv
# (torch, transformers) below that name too
LIBRARY = os.path.dirname(os.path.abspath(hf_contaccum.__file__)) + os.sep


def dispatcher(frame) -> str:
    """Who dispatched an op: the innermost frame outside torch, as a library module or "encoder"; the autograd
    engine's own backward kernels (reached before any frame outside torch: hooks of ours count as ours); or the
    rest (the optimizer, the Trainer)."""
    while frame is not None:
        path = frame.f_code.co_filename
        if frame.f_code.co_name == "_engine_run_backward":
            return "backward"
        if f"{os.sep}torch{os.sep}" not in path and not path.endswith("launch_count.py"):
            if path.startswith(LIBRARY):
                return "hf_contaccum/" + os.path.relpath(path, LIBRARY).replace(os.sep, "/")
            in_transformers = f"{os.sep}transformers{os.sep}" in path
            return "encoder" if in_transformers and not os.path.basename(path).startswith("trainer") else \
                "optimizer, Trainer"
        frame = frame.f_back
    return "optimizer, Trainer"


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()  # (dispatcher, kind) -> ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = "view" if func.is_view else "no kernel" if name in NO_KERNEL else "compute"
        self.counts[(dispatcher(sys._getframe(1)), kind)] += 1
        return func(*args, **(kwargs or {}))


class CountLastStep(TrainerCallback):
    """Counts the ops of the last optimizer step (the earlier ones warm up: first bank writes, lazy allocations)."""

    def __init__(self, last_step: int):
        self.last_step, self.counter = last_step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.last_step - 1:
            self.counter = OpCounter()
            self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.counter is not None and state.global_step == self.last_step:
            self.counter.__exit__(None, None, None)


def count(method: str, n_total: int, bert_base: bool, encoder: str, extra_args: dict) -> dict:
    steps = 2
    counter = CountLastStep(steps)
    gpu_paper.run_method(method, n_total, steps - 1, 1, not bert_base, encoder, extra_args=extra_args,
                         callbacks=[counter])
    micro_steps = n_total // gpu_paper.N_LOCAL  # GradCache: its chunks of N_LOCAL pairs
    per_source = collections.defaultdict(dict)
    for (source, kind), ops in sorted(counter.counter.counts.items()):
        per_source[source][kind] = ops / micro_steps
    compute = {source: kinds.get("compute", 0.0) for source, kinds in per_source.items()}
    return {"method": method, "n_total": n_total, "micro_steps": micro_steps, "trainer_args": extra_args,
            "compute_ops_per_micro_step": sum(compute.values()),
            "library_compute_ops_per_micro_step": sum(v for s, v in compute.items() if s.startswith("hf_contaccum")),
            "per_source": per_source}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="gradaccum,contaccum-8192,gradcache,hybrid")
    parser.add_argument("--n_total", type=int, default=64)
    parser.add_argument("--bert_base", action="store_true", help="gpu_paper's bert-base and 256-token passages "
                        "(on 2 CPU cores ~6 min per method at --n_total 64) instead of a tiny BERT")
    parser.add_argument("--trainer_args", default="{}", help="JSON of extra training arguments for every method")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "performance", "launch_count.json"))
    args = parser.parse_args(argv)
    encoder = gpu_paper.encoder_folder(not args.bert_base)
    results = [count(method, args.n_total, args.bert_base, encoder, json.loads(args.trainer_args))
               for method in args.methods.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"encoder": "bert-base" if args.bert_base else "tiny BERT", "torch": torch.__version__,
                   "results": results}, f, indent=1)
    sources = sorted({s for r in results for s in r["per_source"]})
    print(f"compute ops per micro-step ({'bert-base' if args.bert_base else 'tiny BERT'}, N_total {args.n_total}; "
          "views and allocations not counted)")
    print(f"{'source':<30}" + "".join(f"{r['method']:>16}" for r in results))
    for source in sources + ["all", "hf_contaccum (all)"]:
        cells = [r["per_source"].get(source, {}).get("compute", 0.0) if source not in ("all", "hf_contaccum (all)")
                 else r["compute_ops_per_micro_step"] if source == "all" else r["library_compute_ops_per_micro_step"]
                 for r in results]
        print(f"{source:<30}" + "".join(f"{c:>16.1f}" for c in cells))
    return results


if __name__ == "__main__":
    main()

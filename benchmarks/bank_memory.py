"""What the bank adds to memory beyond its own vectors, per micro-step, on CPU (glibc's live-heap counter
read after every op): the log-sum-exp cache, the temporaries of the loss's forward (they coincide with the
encoder's activations, so they add to the peak), and those of the backward + enqueue, with the time of
the backward + enqueue (mean and max over enough micro-steps for the write pointer to cross a whole cache
chunk, so the costlier enqueues that begin and end a chunk are in the mean). bert-base's d 768, N_local 8
with one hard negative, a pre-filled bank. Writes JSON.

    python -m benchmarks.bank_memory --sizes 8192 65536
    python -m benchmarks.bank_memory --sizes 8192 65536 --steps 5 --output previous.json   # fixed count
    python -m benchmarks.bank_memory --sizes 8192 65536 --steps 3 --bf16 --output bf16.json  # under bf16 autocast
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_heap() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.start = self.peak = live_heap()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, live_heap())
        return out


def measure(size: int, d: int = 768, n: int = 8, steps: int | None = None, bf16: bool = False) -> dict:
    from hf_contaccum import ContAccumLoss

    torch.manual_seed(0)
    loss_fn = ContAccumLoss(size, 0.05, "dot")
    fill = F.normalize(torch.randn(size, d), dim=-1)
    loss_fn.enqueue(fill, fill, torch.arange(size) - 10**12)

    def inputs(step):
        q, p, h = (torch.randn(*shape, requires_grad=True) for shape in ((n, d), (n, d), (n, 1, d)))
        keys = torch.arange(n) + step * n
        return F.normalize(q, dim=-1), F.normalize(p, dim=-1), keys, F.normalize(h, dim=-1), keys[:, None] + 10**9

    loss_fn(*inputs(0)).backward()  # the cache is built; every later micro-step pays only its update
    chunk = getattr(loss_fn.cache, "chunk_size", None) or 16
    steps = steps or chunk // n + 2
    seconds, forward_peak, backward_peak = [], 0, 0
    for step in range(1, steps + 1):
        x = inputs(step)
        with PeakHeap() as forward, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the Trainer's bf16
            loss = loss_fn(*x)
        with PeakHeap() as backward:
            start = time.perf_counter()
            loss.backward()
            seconds.append(time.perf_counter() - start)
        forward_peak = max(forward_peak, forward.peak - forward.start)
        backward_peak = max(backward_peak, backward.peak - backward.start)
        del loss, x
    mib = 2**20
    return {"memory_bank_size": size, "d": d, "bf16_autocast": bf16, "vectors_mib": 2 * size * d * 4 / mib,
            "cache_mib": loss_fn.cache.nbytes() / mib, "chunk_size": chunk,
            "granule": getattr(loss_fn.cache, "granule", None), "micro_steps": steps,
            "forward_temporaries_mib": forward_peak / mib, "backward_and_enqueue_temporaries_mib": backward_peak / mib,
            "backward_and_enqueue_seconds_mean": sum(seconds) / steps,
            "backward_and_enqueue_seconds_max": max(seconds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--steps", type=int, default=None, help="micro-steps per size (default: one chunk's sweep)")
    parser.add_argument("--bf16", action="store_true", help="the loss's forward under bf16 autocast")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "performance", "bank_memory.json"))
    args = parser.parse_args()
    results = [measure(size, steps=args.steps, bf16=args.bf16) for size in args.sizes]
    for r in results:
        print(json.dumps(r))
    with open(args.output, "w") as f:
        json.dump({"device": "cpu", "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

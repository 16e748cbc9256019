"""Sharing a micro-batch across processes (docs/how-it-works.md#several-processes-one-bank).

Passages and hard negatives are gathered WITH gradient: all_gather's backward sums every
rank's gradient back to the owner. Queries and keys are gathered without (they only go
to the bank). accelerate.gather keeps no autograd, so it is never used for tensors that
must carry gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's slice.

    Synchronous collectives only, on purpose: torch's functional collectives (an async work handle
    awaited by wait_tensor) segfaulted inside the backward's reduce-scatter under gloo and DeepSpeed
    ZeRO-2 (torch 2.13): once in CI, once in ~90 two-process train-and-resume test pairs here. The
    backward all-reduces the whole gradient and slices it instead of a reduce-scatter, which gloo only
    emulates with an all-reduce anyway; these are embeddings (N_total x dim), small next to the model's
    own gradient all-reduce."""

    @staticmethod
    def forward(ctx, t):
        ctx.rank, world_size = dist.get_rank(), dist.get_world_size()
        ctx.rows = t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # the all-reduce writes in place: not autograd's buffer
        dist.all_reduce(grad)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order, keeping autograd (see _GatherWithGrad)."""
    return _GatherWithGrad.apply(t.contiguous())


def gather_without_grad(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def gather_padded(*tensors: torch.Tensor) -> tuple:
    """Every rank's (n, w_rank) tensors (all of one width) padded with zeros at the end to the widest rank's,
    each concatenated in rank order (no autograd). The widths are read on the host: one small collective and
    one device read per call."""
    width = int(gather_without_grad(torch.tensor([tensors[0].shape[1]], device=tensors[0].device)).max())
    return tuple(gather_without_grad(torch.nn.functional.pad(t, (0, width - t.shape[1]))) for t in tensors)


def check_equal_shapes(*tensors) -> None:
    """The gathered similarity matrix needs the same shapes on every rank: say so instead of hanging."""
    shape = torch.tensor([[s for t in tensors for s in t.shape]], device=tensors[0].device)
    shapes = gather_without_grad(shape).tolist()
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            f"micro-batches differ across processes (per rank, the shapes of queries / positive keys / hard-negative "
            f"keys: {shapes}); the gathered similarity matrix needs equal shapes. Keep accelerate's even_batches "
            "(default) or set dataloader_drop_last=True, and give every row the same number of hard negatives")

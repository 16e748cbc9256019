"""No non-finite update, ever: the loss and the gradients checked before the optimizer applies a step.

Checked on the device, read on the host once per optimizer step (check_step), or at once per
micro-batch where no step boundary is known (a loop that never calls check_step).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FIXES = ("Usual fixes: lower learning_rate, use similarity='cos' or a larger temperature with dot product, bf16 "
         "instead of fp16, and check the data for broken texts.")


def nonfinite_error(what: str, last_good: str | None = None) -> FloatingPointError:
    kept = (f" The last good checkpoint is {last_good}." if last_good else
            " No checkpoint of this run was saved before it.") if last_good is not False else ""
    return FloatingPointError(f"{what}; stopped before the optimizer applied this step, so no checkpoint holds it.{kept} "
                              f"{FIXES}")


class FiniteGuard:
    """Collects each micro-batch's loss; check_step raises before a step with a non-finite loss or gradient."""

    def __init__(self):
        self.deferred = False  # True: the loop calls check_step before every optimizer step (both trainers do)
        self._loss_sum = None  # this step's micro-batch losses, summed on the device

    def track(self, loss: torch.Tensor) -> None:
        if not self.deferred:
            if not torch.isfinite(loss):
                raise nonfinite_error(f"contrastive loss is {loss.item()}", last_good=False)
            return
        # a sum is non-finite iff a term is (finite losses overflow a sum only near float32's 3e38),
        # and it costs one op per micro-batch where isfinite costs four
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()

    def check_step(self, model: torch.nn.Module | None = None, last_good=None) -> None:
        """Before an optimizer step: raise FloatingPointError if a micro-batch's loss or any gradient of `model`
        is non-finite, naming which. One host read (and, with several processes, one all-reduce, so that every
        process stops on a gradient only one of them holds a shard of)."""
        total, self._loss_sum = self._loss_sum, None
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        flags = [torch.isfinite(total).view(1).to(torch.float32)] if total is not None else []
        if grads:
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shard
            norm = torch.nn.utils.get_total_norm(local)  # one fused kernel per device, no host read
            flags.append(torch.isfinite(norm).view(1).to(torch.float32))
        if not flags:
            return
        ok = torch.cat([f.to(flags[0].device) for f in flags])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        ok = ok.tolist()  # the one host read
        if total is not None and not ok[0]:
            raise nonfinite_error("a micro-batch of this optimizer step had a non-finite contrastive loss", last_good)
        if not all(ok):
            bad = [name for name, p in (model.named_parameters() if model is not None else [])
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            where = f" of {', '.join(bad[:3])}{' and others' if len(bad) > 3 else ''}" if bad else \
                " (on another process)"
            raise nonfinite_error(f"the gradient{where} is non-finite with a finite loss", last_good)

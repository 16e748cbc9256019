"""GradCache (Gao et al. 2021, arXiv 2101.06983) as a wrapper around any loss on embeddings.

One batch in three passes, as sentence-transformers' CachedMultipleNegativesRankingLoss
does it: (1) embed the batch chunk by chunk without a graph, keeping each chunk's RNG
state; (2) compute the loss (ContAccumLoss: bank, gather and enqueue included) on the
detached embeddings and back-propagate to the embeddings only; (3) return the loss with
a backward hook that, when the caller back-propagates it, replays each chunk with its
RNG state (same dropout masks) and pushes the cached embedding gradients, scaled by the
incoming gradient (accumulation division, fp16 loss scale), into the encoder. The
caller's training step is untouched. Activation memory is one chunk's; the price is the
second forward. Under DDP only the last replayed chunk synchronises gradients. Under
DeepSpeed ZeRO-1/2, whose engine reduces each parameter's gradient the moment it is
accumulated and refuses a second one in a step, the chunks before the last are
differentiated with torch.autograd.grad into buffers and the last chunk's backward
carries their sum: each parameter receives its gradient once (the buffers cost one fp32
copy of the trainable parameters). ZeRO-3 (parameters partitioned outside the forward) is
refused with a clear error.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from .data import used_width

AUTOCAST_DEVICES = ("cuda", "cpu")


class _ForwardContext:
    """The RNG and autocast state at one point, to replay a forward exactly (same dropout, same dtype)."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES}

    @contextlib.contextmanager
    def restored(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            for device, (enabled, dtype) in self.autocast.items():
                if enabled:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
            yield


def slice_features(features: dict, begin: int, end: int) -> dict:
    """Rows [begin, end) of tokenised features, without the trailing token columns that are padding
    in every one of those rows (a chunk then costs what a batch of its own texts would)."""
    mask = features.get("attention_mask")
    width = keep = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        width = mask.shape[1]
        keep = used_width(mask[begin:end]) or width
    out = {}
    for key, value in features.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
        elif value.dim() >= 2 and value.shape[1] == width:
            out[key] = value[begin:end, :keep].contiguous()  # a view's strides would make torch.compile recompile
        else:
            out[key] = value[begin:end]
    return out


def chunk_schedule(num_rows: list[int], chunk_size: int, paired: bool) -> list[dict]:
    """The forward calls of one batch: each a {column: (begin, end)} of at most `chunk_size` rows per column.

    Unpaired: every column's chunks in turn, one column per call (sentence-transformers' order).
    Paired: call j embeds chunk j of every column that has one, the columns' last chunks in the last
    call, so that a model with separate towers uses every tower in the call that synchronises DDP."""
    chunks = [[(b, min(b + chunk_size, n)) for b in range(0, n, chunk_size)] for n in num_rows]
    if not paired:
        return [{c: r} for c, column in enumerate(chunks) for r in column]
    longest = max(len(column) for column in chunks)
    return [{c: column[j - longest + len(column)] for c, column in enumerate(chunks)
             if j - longest + len(column) >= 0} for j in range(longest)]


class GradCache:
    """Wraps a loss on embeddings so that the encoder is run in chunks (see the module docstring).

    columns is {column: tokenised features}; embed(model, {column: features}) -> {column: embeddings}
    runs one forward call; loss_fn({column: embeddings}) -> scalar is the loss on the whole batch."""

    def __init__(self, chunk_size: int, paired: bool = False):
        if chunk_size < 1:
            raise ValueError(f"the GradCache chunk size must be >= 1 text per chunk, got {chunk_size}")
        self.chunk_size = chunk_size
        self.paired = paired

    def __call__(self, model, columns: dict, embed: Callable, loss_fn: Callable) -> torch.Tensor:
        check_engine_supports_gradcache()
        names = list(columns)
        schedule = chunk_schedule([_num_rows(columns[c]) for c in names], self.chunk_size, self.paired)
        calls = [{names[c]: slice_features(columns[names[c]], *rows) for c, rows in call.items()} for call in schedule]
        if not torch.is_grad_enabled():  # evaluation: one pass, no cache
            return loss_fn(_concat([embed(model, call) for call in calls], names))
        # (1) embed without a graph, remembering how each call ran
        contexts, leaves = [], []
        with torch.no_grad():
            for call in calls:
                contexts.append(_ForwardContext())
                # a copy, not a view: under CUDA graphs (torch_compile_mode="reduce-overhead") the next call's
                # replay reuses this call's output memory
                leaves.append({c: e.detach().clone().requires_grad_() for c, e in embed(model, call).items()})
        # (2) the loss on the cached embeddings, back-propagated to the embeddings only
        with torch.enable_grad():
            loss = loss_fn(_concat(leaves, names))
            loss.backward()
        cache = [{c: leaf.grad for c, leaf in call.items()} for call in leaves]
        # (3) the encoder's backward happens when the caller back-propagates the returned loss
        result = loss.detach().requires_grad_()
        result.register_hook(lambda grad_output: _replay(model, calls, contexts, cache, embed, grad_output))
        return result


def _num_rows(features: dict) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), torch.Tensor):
            return features[key].shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _concat(calls: list[dict], names: list) -> dict:
    return {c: torch.cat([call[c] for call in calls if c in call]) for c in names}


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage when accelerate runs DeepSpeed, else None."""
    from accelerate.state import AcceleratorState, DistributedType

    if AcceleratorState._shared_state.get("distributed_type") != DistributedType.DEEPSPEED:
        return None
    return AcceleratorState().deepspeed_plugin.zero_stage


def check_engine_supports_gradcache() -> None:
    if (deepspeed_zero_stage() or 0) >= 3:
        raise ValueError("GradCache (gradcache_chunk_size / mini_batch_size) does not work under DeepSpeed ZeRO-3: "
                         "ZeRO-3 gathers a parameter only inside its own forward and backward hooks, and "
                         "DeepSpeed's partitioning fails when GradCache replays chunks from a backward hook. Use ZeRO-2 (accelerate_configs/"
                         "deepspeed_zero2.yaml), FSDP (fsdp.yaml) or DDP, or turn GradCache off.")


def _replay(model, calls, contexts, cache, embed, grad_output) -> None:
    # DeepSpeed reduces a parameter's gradient when it is accumulated and allows one per step
    once = deepspeed_zero_stage() is not None and len(calls) > 1
    params = [p for p in model.parameters() if p.requires_grad] if once else []
    buffers = [None] * len(params)
    with torch.enable_grad():
        for i, (call, context, grads) in enumerate(zip(calls, contexts, cache)):
            last = i == len(calls) - 1
            no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else \
                contextlib.nullcontext()
            with no_sync, context.restored():
                embeddings = embed(model, call)
                surrogate = sum((embeddings[c].float() * grads[c].float()).sum() for c in call if grads[c] is not None)
                surrogate = surrogate * grad_output.float() if torch.is_tensor(surrogate) else surrogate
                if once and not last:
                    if torch.is_tensor(surrogate) and surrogate.requires_grad:
                        for j, grad in enumerate(torch.autograd.grad(surrogate, params, allow_unused=True)):
                            if grad is not None:
                                buffers[j] = grad.float() if buffers[j] is None else buffers[j].add_(grad)
                    continue
                if once:  # d/dp of p . buffer is the buffer: the earlier chunks' sum joins this one backward
                    surrogate = surrogate + sum((p * b.to(p.dtype)).sum() for p, b in zip(params, buffers)
                                                if b is not None)
                if torch.is_tensor(surrogate) and surrogate.requires_grad:
                    surrogate.backward()

"""GradCache (Gao et al. 2021, arXiv 2101.06983) as a wrapper around any loss on embeddings.

One batch in three passes, as sentence-transformers' CachedMultipleNegativesRankingLoss does it:
(1) embed the batch chunk by chunk without a graph, keeping each chunk's RNG state; (2) compute the
loss (ContAccumLoss: bank, gather and enqueue included) on the detached embeddings and back-propagate
to the embeddings only; (3) return the loss with a backward hook that, when the caller back-propagates
it, replays each chunk with its RNG state (same dropout masks) and pushes the cached embedding
gradients, scaled by the incoming gradient (accumulation division, fp16 loss scale), into the encoder.
The caller's training step is untouched. Activation memory is one chunk's; the price is the second
forward. Under DDP only the last replayed chunk synchronises gradients. With `accumulate_once` (DeepSpeed
ZeRO-1/2, whose engine reduces each parameter's gradient the moment it is accumulated and refuses a
second one in a step) the chunks before the last are differentiated into buffers and the last chunk's
backward carries their sum: one fp32 copy of the trainable parameters.
"""
from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .features import num_rows, slice_features, token_counts

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


def row_ranges(features: dict, chunk_size: int, chunk_tokens: int | None = None) -> list[tuple[int, int]]:
    """[begin, end) row ranges of one column: `chunk_size` rows each, or, with `chunk_tokens`, as many rows as fit
    that many real tokens (a row longer than the budget alone), as sentence-transformers' mini_batch_num_tokens."""
    n = num_rows(features)
    counts = token_counts(features) if chunk_tokens else None
    if counts is None:
        if chunk_tokens:
            raise ValueError("a token budget per chunk needs an attention_mask to count tokens: use a row count")
        return [(b, min(b + chunk_size, n)) for b in range(0, n, chunk_size)]
    cumulative, total = [], 0
    for count in counts:
        total += count
        cumulative.append(total)
    ranges, begin = [], 0
    while begin < n:
        end = max(bisect.bisect_right(cumulative, (cumulative[begin - 1] if begin else 0) + chunk_tokens), begin + 1)
        ranges.append((begin, end))
        begin = end
    return ranges


def chunk_schedule(columns: list[list[tuple[int, int]]], paired: bool) -> list[dict]:
    """The forward calls of one batch, from each column's row ranges: each call a {column: (begin, end)}.

    Unpaired: every column's chunks in turn, one column per call (sentence-transformers' order).
    Paired: call j embeds chunk j of every column that has one, the columns' last chunks in the last
    call, so that a model with separate towers uses every tower in the call that synchronises DDP."""
    if not paired:
        return [{c: r} for c, column in enumerate(columns) for r in column]
    longest = max(len(column) for column in columns)
    return [{c: column[j - longest + len(column)] for c, column in enumerate(columns)
             if j - longest + len(column) >= 0} for j in range(longest)]


class GradCache:
    """Wraps a loss on embeddings so that the encoder is run in chunks (see the module docstring).

    columns is {column: tokenised features}; embed(model, {column: features}) -> {column: embeddings}
    runs one forward call; loss_fn({column: embeddings}) -> scalar is the loss on the whole batch."""

    def __init__(self, chunk_size: int, paired: bool = False, chunk_tokens: int | None = None,
                 show_progress: bool = False):
        if chunk_size < 1 or (chunk_tokens is not None and chunk_tokens < 1):
            raise ValueError(f"a GradCache chunk holds at least 1 text (chunk size {chunk_size}) and 1 token "
                             f"(token budget {chunk_tokens})")
        self.chunk_size, self.chunk_tokens = chunk_size, chunk_tokens
        self.paired, self.show_progress = paired, show_progress
        self.accumulate_once = False  # set by the trainer's lifecycle under DeepSpeed ZeRO-1/2

    def __call__(self, model, columns: dict, embed: Callable, loss_fn: Callable) -> torch.Tensor:
        names = list(columns)
        ranges = [row_ranges(columns[c], self.chunk_size, self.chunk_tokens) for c in names]
        calls = [{names[c]: slice_features(columns[names[c]], *rows) for c, rows in call.items()}
                 for call in chunk_schedule(ranges, self.paired)]
        if not torch.is_grad_enabled():  # evaluation: one pass, no cache
            return loss_fn(_concat([embed(model, call) for call in calls], names))
        # (1) embed without a graph, remembering how each call ran
        contexts, leaves = [], []
        with torch.no_grad():
            for call in tqdm(calls, desc="GradCache: embed", disable=not self.show_progress):
                contexts.append(_ForwardContext())
                # a copy, not a view: under CUDA graphs the next call's replay reuses this call's output memory
                leaves.append({c: e.detach().clone().requires_grad_() for c, e in embed(model, call).items()})
        # (2) the loss on the cached embeddings, back-propagated to the embeddings only
        with torch.enable_grad():
            loss = loss_fn(_concat(leaves, names))
            loss.backward()
        cache = [{c: leaf.grad for c, leaf in call.items()} for call in leaves]
        # (3) the encoder's backward happens when the caller back-propagates the returned loss
        result = loss.detach().requires_grad_()
        result.register_hook(lambda grad_output: self._replay(model, calls, contexts, cache, embed, grad_output))
        return result

    def _replay(self, model, calls, contexts, cache, embed, grad_output) -> None:
        once = self.accumulate_once and len(calls) > 1
        params = [p for p in model.parameters() if p.requires_grad] if once else []
        buffers = [None] * len(params)
        with torch.enable_grad():
            for i, (call, context, grads) in enumerate(zip(calls, contexts, cache)):
                last = i == len(calls) - 1
                no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else \
                    contextlib.nullcontext()
                with no_sync, context.restored():
                    embeddings = embed(model, call)
                    surrogate = sum((embeddings[c].float() * grads[c].float()).sum() for c in call
                                    if grads[c] is not None)
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


def _concat(calls: list[dict], names: list) -> dict:
    return {c: torch.cat([call[c] for call in calls if c in call]) for c in names}

"""ContAccumLoss: one ContAccum micro-step, end to end, on embeddings (docs/how-it-works.md).

Rows are the current queries and the banked queries; columns are the current positives, the current
hard negatives, the banked positives and (optionally) the banked hard negatives. Every banked vector
is a constant, so current rows need autograd through the current query and every current column,
and banked rows only through the current columns: what they need of the banked columns is one
constant per row, kept up to date by BankLogsumexp.

The loss reads the bank in place, so the micro-batch is enqueued only once the backward has used it:
from a hook that fires when the gradients of every tensor that read the bank are computed. Without a
backward (no grad, or eval mode) nothing is enqueued and the bank is not read.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Variable

from ..settings import SIMILARITIES, ContAccumSettings, legacy_arguments, normalize
from .bank import MemoryBank
from .diagnostics import TrainingDiagnostics
from .finite import FiniteGuard, nonfinite_error
from .gather import check_equal_shapes, gather_with_grad, gather_without_grad, world
from .infonce import infonce
from .inputs import LossStats, autocast_off, check_bank_fits, check_inputs
from .lse_cache import BankLogsumexp
from .objective import Objective, extended_infonce
from .staleness import Staleness


class ContAccumLoss(nn.Module):
    """InfoNCE over [current ; banked] queries x [current ; banked] passages, for any training loop.

    Args:
        memory_bank_size: the bank's size in samples (0: plain in-batch InfoNCE; under accumulation, gradient
            accumulation). "auto" needs a Trainer (it is the pairs of one optimizer step).
        temperature: logits are similarity / temperature (default: 0.05 for "cos", 1.0 for "dot").
        similarity (str): "dot" or "cos".
        query_memory_bank_size: an ablation's smaller query bank (ContAccumSettings).
        bank_hard_negatives: also bank hard negatives (ContAccumSettings).
        mask_false_negatives: mask a query's own passage among its negatives (ContAccumSettings).
        gather_across_devices: one global bank across processes (ContAccumSettings).
        bank_refresh_steps: re-encode the bank every N steps (ContAccumSettings).
        bank_drift_probe: move the bank by the measured drift (ContAccumSettings).
        settings: a ContAccumSettings instead of the arguments above.
        objective: sentence-transformers' directions, partition mode and hardness weighting (core/objective.py);
            the default is the paper's query -> passage InfoNCE.

    Call it in train mode under autograd on (queries (n, d), positives (n, d), positive keys (n,), hard negatives
    (n, H, d), their keys (n, H)); it returns the mean loss over the n (x processes) + banked rows. Keys are int64
    ids, equal for the same passage; without keys nothing is masked. Before each optimizer step, call
    `check_finite()` (or let a trainer's lifecycle do it).
    """

    def __init__(self, memory_bank_size: int | str = 0, temperature: float | None = None, similarity="dot", *,
                 query_memory_bank_size: int | None = None, bank_hard_negatives: bool = False,
                 mask_false_negatives: bool = True, gather_across_devices: bool = False, bank_refresh_steps: int = 0,
                 bank_drift_probe: int = 0, settings: ContAccumSettings | None = None,
                 objective: Objective | None = None, **retired):
        super().__init__()
        query_memory_bank_size = legacy_arguments("ContAccumLoss", retired, query_memory_bank_size)
        if settings is None:
            settings = ContAccumSettings(memory_bank_size, query_memory_bank_size, similarity, temperature,
                                         bank_hard_negatives, mask_false_negatives, gather_across_devices,
                                         bank_refresh_steps, bank_drift_probe)
        self.settings = settings
        size = settings.bank_size()
        self.similarity, self.temperature = settings.similarity, settings.temperature_value
        self.query_bank_size = settings.query_bank_size if settings.query_memory_bank_size is not None else size
        self.mask_false_negatives, self.gather_across_devices = settings.mask_false_negatives, \
            settings.gather_across_devices
        self.bank = MemoryBank(size, settings.bank_hard_negatives)
        self.cache = BankLogsumexp(self.temperature, self.mask_false_negatives)
        self.staleness = Staleness(settings.bank_refresh_steps, settings.bank_drift_probe, self.gather_across_devices)
        self.diagnostics, self.finite = TrainingDiagnostics(), FiniteGuard()
        self.objective = objective or Objective()
        # anything but the default objective with dot or cos goes the general way, without the incremental cache
        self.extended = not self.objective.is_default or self.similarity not in SIMILARITIES
        self.last_stats: LossStats | None = None
        self._anonymous_keys_used = 0

    @property
    def memory_bank_size(self) -> int:
        return self.bank.size

    def extra_repr(self) -> str:
        return (f"memory_bank_size={self.bank.size}, query_memory_bank_size={self.query_bank_size}, "
                f"temperature={self.temperature}, similarity={self.similarity!r}")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The vector the similarity compares, in fp32 (unit length for cosine)."""
        return normalize(x, self.similarity)

    # -- the micro-step ----------------------------------------------------------------
    def forward(self, queries, positives, positive_keys=None, hard_negatives=None, hard_negative_keys=None, *,
                enqueue: bool = True):
        """enqueue=False: read the bank but keep this micro-batch out of it (a wrapper's further call of one batch)."""
        training = self.training and torch.is_grad_enabled()
        rank, size = world() if training and self.gather_across_devices else (0, 1)
        n = queries.shape[0]
        if hard_negatives is not None and hard_negatives.shape[1] == 0:
            hard_negatives = hard_negative_keys = None
        check_inputs(queries, positives, positive_keys, hard_negatives, hard_negative_keys, self.bank.dim)
        # hooks go on per-call aliases: a hook on a leaf the caller reuses would stay and pile up
        queries, positives, hard_negatives = (t.view_as(t) if t is not None and t.requires_grad else t
                                              for t in (queries, positives, hard_negatives))
        if positive_keys is None:
            positive_keys = self._anonymous_keys((n,), queries.device, rank, size)
        if hard_negatives is not None and hard_negative_keys is None:
            hard_negative_keys = self._anonymous_keys(hard_negatives.shape[:2], queries.device, rank, size)
        if hard_negative_keys is None:
            hard_negative_keys = positive_keys.new_zeros(n, 0)
        if training:
            check_bank_fits(self.bank.size, n, size)
            self.move_bank_to(queries.device)
            self.diagnostics.track_raw_grad_norm_ratio(queries, positives, hard_negatives)
        q_bank, p_all, pk_all, hn_all, hk_all = queries.detach(), positives, positive_keys, hard_negatives, \
            hard_negative_keys
        if size > 1:  # every rank enqueues the same gathered micro-batch in rank order: one global bank
            check_equal_shapes(queries, positive_keys, hard_negative_keys)
            q_bank, pk_all, hk_all = (gather_without_grad(t) for t in (queries, positive_keys, hard_negative_keys))
            p_all = gather_with_grad(positives)
            hn_all = gather_with_grad(hard_negatives) if hard_negatives is not None else None
        # autocast off: fp32 logits, and the products read the bank in place (under bf16 autocast each product
        # cast the bank to bf16 and kept that copy for its backward)
        with autocast_off(queries.device.type):
            if self.extended:
                needs_queries = set(self.objective.directions) & {"query_to_query", "doc_to_query"}
                q_all = gather_with_grad(queries) if size > 1 and needs_queries else q_bank if size > 1 else queries
                loss, counted, columns, banked_columns, bank_readers = extended_infonce(
                    self, self.prepare(queries), self.prepare(q_all), self.prepare(p_all), pk_all,
                    None if hn_all is None else self.prepare(hn_all), hk_all, training, rank, size)
                stats = LossStats(counted, columns, math.log(columns), banked_columns)
            else:
                loss, stats, bank_readers = infonce(self, queries, p_all, pk_all, hn_all, hk_all, training, rank, size)
        self.last_stats = stats
        if training:
            self.finite.track(loss)
            if enqueue:
                self.diagnostics.micro_batch(stats, queries, positives, loss)
                entry = (q_bank, p_all.detach(), pk_all, None if hn_all is None else hn_all.detach(), hk_all)
                self._enqueue_after_backward(bank_readers, entry)
        elif not torch.isfinite(loss):
            raise nonfinite_error(f"contrastive loss is {loss.item()}", last_good=False)
        return loss

    # -- the bank ----------------------------------------------------------------------
    def _enqueue_after_backward(self, bank_readers, entry) -> None:
        readers = [t for t in bank_readers if t.requires_grad]
        if not readers:  # no graph reads the bank: enqueue now
            self.enqueue(*entry)
            return

        def after_backward(grads):
            if len(grads) == 2 and grads[0] is not None and grads[1] is not None:
                self.diagnostics.record_grad_norm_ratio(query=grads[0], passage=grads[1])
            # the enqueue (and its cache update) runs when this whole backward pass ends: the encoder's
            # activations are freed by then, so the update's temporaries never add to the peak
            Variable._execution_engine.queue_callback(lambda: self.enqueue(*entry))

        torch.autograd.graph.register_multi_grad_hook(readers, after_backward)

    @torch.no_grad()
    def enqueue(self, queries, positives, positive_keys, hard_negatives=None, hard_negative_keys=None) -> None:
        """Write vectors to the bank now (training enqueues by itself; this is for pre-filling)."""
        if self.bank.size == 0:
            return
        hn = self.prepare(hard_negatives) if hard_negatives is not None else None
        if self.query_bank_size > 0:  # the cache reads the vectors about to be overwritten first
            self.cache.before_write(self.bank, queries.shape[0])
        written = self.bank.enqueue(self.prepare(queries), self.prepare(positives), positive_keys, hn,
                                    hard_negative_keys)
        if self.query_bank_size > 0:
            self.cache.update(self.bank, written)

    def begin_step(self, step: int) -> None:
        """Call at the start of each optimizer step (step = steps done): the staleness controls run at its first
        micro-batch (see before_micro_batch). The trainers' lifecycle calls it."""
        self.staleness.begin_step(step)

    def before_micro_batch(self, tokens: dict, encode, model: nn.Module) -> None:
        """With bank_refresh_steps or bank_drift_probe: call before each training micro-batch's forward with its
        tokens ({"query" | "passage": {"input_ids", "attention_mask"}}) and `encode` ({"query": features,
        "passage": features} -> (query vectors, passage vectors)) through `model`."""
        self.move_bank_to(next(iter(tokens["query"].values())).device)  # a resumed bank starts on the CPU
        if self.staleness.before_micro_batch(self.bank, tokens, encode, model, self.prepare):
            self.cache.stale = True

    def check_finite(self, model: nn.Module | None = None, last_good=None) -> None:
        """Before each optimizer step: raise FloatingPointError if this step's loss or a gradient of `model` is
        non-finite (deferred checks only; see defer_finite_check_to_step)."""
        self.finite.check_step(model, last_good)

    def defer_finite_check_to_step(self) -> None:
        """For loops that call check_finite() before every optimizer step (both trainers do): finiteness is then
        read once per step instead of once per micro-batch."""
        self.finite.deferred = True

    def check_collapse(self, patience: int) -> None:
        """Call once per optimizer step; raises EmbeddingCollapseError or NoNegativesError (diagnostics.py)."""
        self.diagnostics.check_collapse(patience)

    def pop_log_stats(self) -> dict:
        """Means since the last call: negatives per query, GradNormRatios; and the bank fill."""
        return self.diagnostics.pop(self.bank.fill)

    def reset(self) -> None:
        """Empty the bank (e.g. after every optimizer step, for the ablation)."""
        self.bank.reset()
        self.staleness.reset()
        self.cache.stale = True

    def move_bank_to(self, device) -> None:
        """The bank, its cache and the staleness state on `device` (a bank restored from a file starts on the CPU)."""
        if self.bank.queries is not None and self.bank.queries.device != torch.device(device):
            self.bank.to(device)
            self.cache.to(device)
        self.staleness.to(device)

    def _anonymous_keys(self, shape, device, rank, size):
        """Negative ids, unique across micro-batches and ranks: never equal to each other or to a real key."""
        count = math.prod(shape)
        ids = self._anonymous_keys_used + torch.arange(count, device=device)
        self._anonymous_keys_used += count
        return (-1 - (ids * size + rank)).view(*shape)

    # -- checkpoints: core/checkpoint.py writes this state to files ----------------------
    def get_extra_state(self) -> dict:
        return {"bank": self.bank.state_dict(), "lse_cache": self.cache.state_dict(),
                "query_bank_size": self.query_bank_size, "staleness": self.staleness.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])  # refuses another size, naming the setting
        if state["query_bank_size"] != self.query_bank_size:
            raise ValueError(f"the saved query bank has {state['query_bank_size']} entries, this run asks for "
                             f"{self.query_bank_size}: resume with the same query_memory_bank_size")
        self.cache.load_state_dict(state["lse_cache"])
        self.staleness.load_state_dict(state["staleness"])

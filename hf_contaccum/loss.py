"""ContAccumLoss: one ContAccum micro-step, end to end, on embeddings (design.md §2, §3, §6).

Rows are the current queries and the banked queries; columns are the current positives,
the current hard negatives, the banked positives and (optionally) the banked hard
negatives. Every banked vector is a constant, so:

* current rows need autograd through the current query and all current columns;
* banked rows need autograd only through the current columns; what they need of the
  banked columns is one constant per row, kept by `BankLogsumexp` (bank.py).

The module owns the whole micro-step: the optional gather across processes, the loss,
and the enqueue of the micro-batch. The loss reads the bank in place (no copy), so the
enqueue must wait until the backward has used it: it runs from a backward hook that
fires once the gradients of every tensor that read the bank are computed. Without a
backward (no grad, or eval mode) nothing is enqueued and the bank is not read.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable

from .bank import NEG_INF, BankLogsumexp, MemoryBank, bank_columns
from .diagnostics import TrainingDiagnostics
from .gather import (
    check_equal_shapes,
    gather_padded,
    gather_with_grad,
    gather_without_grad,
    world,
)
from .gradcache import deepspeed_zero_stage

SIMILARITIES = ("dot", "cos")
BANK_FILE = "contaccum_bank_rank{rank}.pt"


@dataclass
class LossStats:
    num_rows: int  # loss rows: current queries + banked queries
    num_columns: int  # candidate passages per row (negatives per query = this - 1)
    uniform_loss: float  # the loss if every candidate scored the same: log of the candidates (banked ones count w)
    banked_columns: int = 0  # candidates read from the memory bank


def _autocast_off(device_type: str):
    """autocast switched off on this device, where autocast exists for it (not on meta tensors, say)."""
    available = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cuda", "cpu"))  # torch < 2.4
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _nonfinite_loss_error(value: float | None = None) -> FloatingPointError:
    """value: the loss, or None when the check was deferred to the optimizer step (the value is not kept)."""
    what = f"contrastive loss is {value}" if value is not None else \
        "a micro-batch of this optimizer step had a non-finite contrastive loss"
    return FloatingPointError(
        f"{what}; stopped before applying it, so the last checkpoint is intact. Usual fixes: lower "
        "learning_rate, use similarity='cos' or a larger temperature with dot product, bf16 instead of fp16, "
        "and check the data for broken texts.")


class ContAccumLoss(nn.Module):
    """InfoNCE over [current ; banked] queries x [current ; banked] passages.

    Args:
        memory_bank_size: N_mem, in samples, of both banks (0: plain in-batch InfoNCE,
            i.e. gradient accumulation when used under accumulation).
        temperature: logits are similarity / temperature (sentence-transformers' scale = 1 / temperature).
        similarity: "dot" or "cos".
        query_bank_size: ablation override of the query bank (default memory_bank_size; 0 gives
            pre-batch negatives). Must be <= memory_bank_size: a banked query needs its banked positive.
        bank_hard_negatives: also bank each query's hard negatives as further columns.
        mask_false_negatives: a column whose key equals the row's positive key (other than that
            positive itself) is never a negative.
        gather_across_devices: with several processes, share every micro-batch (passages with
            gradient), so the bank is one global pool, identical on every rank.
        bank_chunk_size: bank slots per cached log-sum-exp block (advanced; default: about 2 N_mem / (d / 10),
            with the cache near 5 % of the bank vectors' own size at any N_mem; see BankLogsumexp.auto_sizes).
        bank_weight: staleness control, 0 < w <= 1 (default 1, the paper). Every banked entry counts w times:
            a banked column adds w (not 1) to a row's softmax denominator (its logit gets + log w), and a
            banked row weighs w in the mean over rows. w -> 0 tends to gradient accumulation.

        bank_warmup_steps: fill the bank but do not read it before this optimizer step (XBM's warm-up); the
            training loop reports each step with `start_step(global_step)`.

    Call it in train mode under autograd on (queries (n, d), positives (n, d), positive keys (n,),
    hard negatives (n, H, d), their keys (n, H)); it returns the mean loss over the
    n (x processes) + N_mem rows. The micro-batch joins the bank when its backward has run.
    Keys are int64 ids: equal keys mean the same passage. Without keys nothing is masked.
    """

    def __init__(self, memory_bank_size: int = 0, temperature: float = 1.0, similarity: str = "dot", *,
                 query_bank_size: int | None = None, bank_hard_negatives: bool = False,
                 mask_false_negatives: bool = True, gather_across_devices: bool = False,
                 bank_chunk_size: int | None = None, bank_weight: float = 1.0, bank_warmup_steps: int = 0):
        super().__init__()
        if not 0 < bank_weight <= 1:
            raise ValueError(f"bank_weight must be in (0, 1] (1: every banked entry counts fully), got {bank_weight}")
        if bank_warmup_steps < 0:
            raise ValueError(f"bank_warmup_steps must be >= 0, got {bank_warmup_steps}")
        query_bank_size = memory_bank_size if query_bank_size is None else query_bank_size
        if query_bank_size < 0 or memory_bank_size < 0:
            raise ValueError("memory bank sizes are numbers of samples and must be >= 0 (0 disables the bank)")
        if query_bank_size > memory_bank_size:
            raise ValueError(
                f"query bank ({query_bank_size}) > passage bank ({memory_bank_size}): a banked query needs its "
                "banked positive as a column; make the passage bank at least as large")
        if query_bank_size < memory_bank_size:
            warnings.warn(
                f"query bank {query_bank_size} < passage bank {memory_bank_size}: {memory_bank_size - query_bank_size} "
                "banked passages are negatives without their queries as loss rows, so the passage side's gradient "
                "outgrows the query side's (ContAccum paper §3.3). Measured (benchmarks/staleness.py, N_total 32, "
                "query bank 32, passage bank 128): below plain gradient accumulation on all three real tasks, "
                "WordNet nDCG@10 0.10 and 0.28 from 0.44 pretrained. Use equal sizes unless this is an ablation.",
                stacklevel=3)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.query_bank_size = query_bank_size
        self.temperature = float(temperature)
        self.similarity = similarity
        self.bank_weight = float(bank_weight)
        self.bank_warmup_steps = bank_warmup_steps
        self.read_bank = True  # False during the warm-up: the bank fills but is not read
        self.mask_false_negatives = mask_false_negatives
        self.gather_across_devices = gather_across_devices
        self.bank = MemoryBank(memory_bank_size, bank_hard_negatives)
        self.bank_lse = BankLogsumexp(bank_chunk_size)
        self.last_stats: LossStats | None = None
        self.restored_step = None  # the global_step saved with the last checkpoint loaded
        self._anonymous_keys_used = 0
        self.diagnostics = TrainingDiagnostics()
        # False: a non-finite loss raises at once (a host sync per micro-batch); see defer_finite_check_to_step
        self.defer_finite_check = False
        self._loss_sum = None  # with defer_finite_check: this step's micro-batch losses, summed on the device
        self.drift_probe = None  # bank_drift_probe: {side: token features} re-encoded at every step's start
        self.drift_means = None  # the probe's mean (query, passage) vectors at the last correction

    @property
    def memory_bank_size(self) -> int:
        return self.bank.capacity

    def extra_repr(self) -> str:
        return (f"memory_bank_size={self.bank.capacity}, query_bank_size={self.query_bank_size}, "
                f"temperature={self.temperature}, similarity={self.similarity!r}")

    # -- the micro-step ----------------------------------------------------------------
    def forward(self, queries, positives, positive_keys=None, hard_negatives=None, hard_negative_keys=None):
        training = self.training and torch.is_grad_enabled()
        rank, size = world() if training and self.gather_across_devices else (0, 1)
        n = queries.shape[0]
        if hard_negatives is not None and hard_negatives.shape[1] == 0:
            hard_negatives = hard_negative_keys = None
        _check_inputs(queries, positives, positive_keys, hard_negatives, hard_negative_keys)
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
            check_bank_fits(self.bank.capacity, n, size)
            self.move_bank_to(queries.device)
            self.diagnostics.track_raw_grad_norm_ratio(queries, positives, hard_negatives)
        q_bank, p_all, pk_all, hn_all, hk_all = queries.detach(), positives, positive_keys, hard_negatives, \
            hard_negative_keys
        if size > 1:  # every rank enqueues the same gathered micro-batch in rank order: one global bank
            check_equal_shapes(queries, positive_keys, hard_negative_keys)
            q_bank, pk_all, hk_all = (gather_without_grad(t) for t in (queries, positive_keys, hard_negative_keys))
            p_all = gather_with_grad(positives)
            hn_all = gather_with_grad(hard_negatives) if hard_negatives is not None else None
        # autocast off: the logits are fp32 (as _prepare means them to be), and the products read the bank in place.
        # Under bf16 autocast each product cast the N_mem x d bank to bf16 and kept that copy for its backward:
        # 2 x 96 MiB at N_mem 65,536 x 768, the size of the excess over vectors and cache measured on an H200.
        with _autocast_off(queries.device.type):
            loss, stats, bank_readers = self._infonce(queries, p_all, pk_all, hn_all, hk_all, training, rank, size)
        if training and self.defer_finite_check:  # on the device; check_finite() reads it once per step
            # a sum is non-finite iff a term is (finite losses overflow a sum only near float32's 3e38),
            # and it costs one op per micro-batch where isfinite costs four
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        elif not torch.isfinite(loss):
            raise _nonfinite_loss_error(loss.item())
        self.last_stats = stats
        if training:
            self.diagnostics.micro_batch(stats, queries, positives, loss)
            entry = (q_bank, p_all.detach(), pk_all, None if hn_all is None else hn_all.detach(), hk_all)
            self._enqueue_after_backward(bank_readers, entry)
        return loss

    def _infonce(self, queries, passages, passage_keys, hard_negatives, hard_negative_keys, use_bank, rank,
                 world_size):
        """Mean InfoNCE over all rows, and the tensors whose backward reads the bank.

        Distributed (world_size R): queries are this rank's n; passages, hard negatives and
        keys are gathered from all ranks in rank order (R*n rows), so query i's positive is
        passages[rank*n + i]. Each rank counts its own query rows and every R-th banked row;
        the result is scaled by R so that DDP's gradient average gives the gradient of the
        one global mean over R*n + N_mem rows.
        """
        q, p = self._prepare(queries), self._prepare(passages)  # q is never a leaf: forward aliased the queries
        n = q.shape[0]
        cols, keys = [p], [passage_keys]
        if hard_negatives is not None:
            cols.append(self._prepare(hard_negatives).flatten(0, 1))
            keys.append(hard_negative_keys.flatten())
        cur_cols, cur_keys = torch.cat(cols), torch.cat(keys)
        bank = self.bank
        banked = use_bank and bank.fill > 0 and self.read_bank
        log_w = math.log(self.bank_weight)  # 0 unless staleness is down-weighted
        own = slice(rank * n, rank * n + n)  # this rank's positives among the current columns
        targets = torch.arange(own.start, own.stop, device=q.device)
        logits, all_keys = q @ cur_cols.T / self.temperature, cur_keys
        if banked:  # banked columns: separate matmul, so the bank is read in place, never copied
            bvecs, bkeys = bank_columns(bank)
            bank_logits = q @ bvecs.flatten(0, 1).T / self.temperature
            logits = torch.cat([logits, bank_logits + log_w if log_w else bank_logits], 1)
            all_keys = torch.cat([cur_keys, bkeys.flatten()])
        if self.mask_false_negatives:
            same = all_keys[None] == passage_keys[own][:, None]
            same[:, own].diagonal().fill_(False)  # each row keeps its own positive
            logits = logits.masked_fill(same, NEG_INF)
        total = F.cross_entropy(logits, targets, reduction="sum")
        num_rows = counted = n * world_size  # every rank's current rows count in the global mean

        if banked and self.query_bank_size > 0:
            if self.query_bank_size >= bank.fill:
                rows = slice(rank, bank.fill, world_size)  # a slice reads the bank without a copy
                total_bank_rows = bank.fill
            else:
                newest = bank.newest(self.query_bank_size)
                rows, total_bank_rows = newest[rank::world_size], len(newest)
            num_bank_rows = len(range(*rows.indices(bank.capacity))) if isinstance(rows, slice) else len(rows)
            weight = self.bank_weight
            num_rows += weight * (total_bank_rows - num_bank_rows)  # other ranks' share of the banked rows
            if num_bank_rows:
                if self.bank_lse.stale:
                    self.bank_lse.update(bank, (bank.ptr, 0), self.temperature, self.mask_false_negatives)
                # (N_mem, columns) logits: scaled on the small side and masked in place (the product's backward
                # does not read it), so the only N_mem-row temporaries are this one and logsumexp's
                cur_logits = bank.queries[rows] @ (cur_cols.T / self.temperature)
                if self.mask_false_negatives:
                    cur_logits.masked_fill_(cur_keys[None] == bank.passage_keys[rows][:, None], NEG_INF)
                # the row's banked columns, its own positive included, count w each
                # (no "+ 0" or "* 1" when bank_weight is 1: each would be one more op on a launch-bound GPU)
                banked_lse, target = self.bank_lse.row_lse(rows), self.bank_lse.row_positive_logit(rows)  # cached
                if log_w:
                    banked_lse, target = banked_lse + log_w, target + log_w
                bank_total = (torch.logaddexp(cur_logits.logsumexp(-1), banked_lse) - target).sum()
                total = total + (weight * bank_total if weight != 1 else bank_total)
                num_rows += weight * num_bank_rows
            counted += total_bank_rows
        num_banked = logits.shape[1] - cur_cols.shape[0]
        stats = LossStats(counted, logits.shape[1], math.log(cur_cols.shape[0] + self.bank_weight * num_banked), num_banked)
        # num_rows is the weighted count the mean divides by (= counted with bank_weight 1)
        # q @ banked columns saved the banked passages (for q's gradient); banked rows @ current columns
        # saved the banked queries (for the columns' gradient): once both gradients exist, the bank is free.
        return (total * world_size if world_size > 1 else total) / num_rows, stats, (q, cur_cols)

    def _prepare(self, x):
        x = x.float()  # logits and log-sum-exp in fp32, whatever the encoder's autocast dtype
        return F.normalize(x, dim=-1) if self.similarity == "cos" else x

    # -- the bank ----------------------------------------------------------------------
    def _enqueue_after_backward(self, bank_readers, entry) -> None:
        readers = [t for t in bank_readers if t.requires_grad]
        if not readers:  # no graph reads the bank: enqueue now
            self.enqueue(*entry)
            return

        def after_backward(grads):
            if len(grads) == 2 and grads[0] is not None and grads[1] is not None:
                self.diagnostics.record_grad_norm_ratio(query=grads[0], passage=grads[1])
            # the enqueue (and its cache refresh) runs when this whole backward pass ends: the encoder's
            # activations are freed by then, so the refresh's temporaries never add to the peak
            Variable._execution_engine.queue_callback(lambda: self.enqueue(*entry))

        torch.autograd.graph.register_multi_grad_hook(readers, after_backward)

    @torch.no_grad()
    def enqueue(self, queries, positives, positive_keys, hard_negatives=None, hard_negative_keys=None) -> None:
        """Write vectors to the bank now (training enqueues by itself; this is for pre-filling)."""
        if self.bank.capacity == 0:
            return
        hn = self._prepare(hard_negatives) if hard_negatives is not None else None
        if self.query_bank_size > 0:  # the cache reads the vectors about to be overwritten first
            self.bank_lse.before_write(self.bank, queries.shape[0], self.temperature, self.mask_false_negatives)
        written = self.bank.enqueue(self._prepare(queries), self._prepare(positives), positive_keys, hn,
                                    hard_negative_keys)
        if self.query_bank_size > 0:
            self.bank_lse.update(self.bank, written, self.temperature, self.mask_false_negatives)

    # -- staleness control by re-encoding (bank_refresh_steps) ----------------------------
    def _bank_processes(self) -> tuple[int, int]:
        """(rank, number of processes) sharing the bank: (0, 1) unless one global bank is gathered."""
        return world() if self.gather_across_devices else (0, 1)

    @torch.no_grad()
    def keep_tokens(self, features: dict) -> None:
        """Keep the tokens of the pairs this micro-batch will bank, so that refresh_bank can encode them again.
        features: {"query" | "passage": {"input_ids", "attention_mask"}} of this process's pairs, on the device.
        Call before the micro-batch's forward: its backward enqueues the pairs from the bank's pointer on (a global
        bank: every process's, in rank order), so their tokens go there (gathered, padded to the widest)."""
        if self._bank_processes()[1] > 1:
            features = {side: dict(zip(f, gather_padded(*f.values()))) for side, f in features.items()}
        self.bank.write_tokens(self.bank.ptr, features)

    @torch.no_grad()
    def refresh_bank(self, encode, block: int = 256) -> None:
        """Encode every banked pair again with `encode` ({"query": features, "passage": features} -> (query
        vectors, passage vectors), no gradient) and replace the banked vectors; the log-sum-exp cache is rebuilt
        when next read. ANCE's periodic refresh: afterwards no banked vector is older than the encoder.

        A global bank shared by P processes (every one holds every pair's tokens) is split in P shares: each
        process encodes its own and the vectors are gathered. All processes call the model equally often with
        equally many rows (a sharded engine gathers parameters in every call), so a share that would run past
        the bank's end encodes the last `count` rows instead and keeps only its own.

        Each side's texts are taken shortest first (a stable sort of their lengths, the same on every process), so
        a block pads its texts to about their own length rather than to the longest of `block` arbitrary ones."""
        bank = self.bank
        if not bank.tokens or bank.fill == 0:
            return
        rank, processes = self._bank_processes()
        sides = ("query", "passage")
        slots = {side: torch.sort(bank.tokens[side][1][:bank.fill].sum(1), stable=True).indices for side in sides}
        share = -(-bank.fill // processes)  # texts per process and side, the last share possibly shorter
        for offset in range(0, share, block):
            count = min(block, share - offset)
            firsts = [r * share + offset for r in range(processes)]  # each process's first text of this block
            encoded = [min(first, bank.fill - count) for first in firsts]  # the texts it encodes: [e, e + count)
            mine = slice(encoded[rank], encoded[rank] + count)
            queries, passages = encode({side: bank.token_features(slots[side][mine], side) for side in sides})
            if processes > 1:
                queries, passages = gather_without_grad(queries), gather_without_grad(passages)
            for r, (first, start) in enumerate(zip(firsts, encoded)):
                own = max(0, min(count, bank.fill - first))  # texts of process r's share in this block
                part = slice(r * count + first - start, r * count + first - start + own)
                if own:
                    bank.queries[slots["query"][first:first + own]] = self._prepare(queries[part]).to(bank.queries.dtype)
                    bank.passages[slots["passage"][first:first + own]] = self._prepare(passages[part]).to(
                        bank.passages.dtype)
        self.bank_lse.stale = True

    # -- staleness control by a drift probe (bank_drift_probe) ------------------------------
    @torch.no_grad()
    def keep_drift_probe(self, features: dict, size: int) -> None:
        """Keep the first `size` pairs of this micro-batch as the drift probe (once; a later call does nothing).
        features: {"query" | "passage": {"input_ids", "attention_mask"}} of this process's pairs, on the device."""
        if self.drift_probe is None:
            self.drift_probe = {side: {key: t[:size].clone() for key, t in f.items()} for side, f in features.items()}

    @torch.no_grad()
    def correct_drift(self, encode, model: nn.Module) -> None:
        """Move every banked vector by the encoder's drift since the last call, measured on the probe.

        Call at the start of each optimizer step with `encode` ({"query": features, "passage": features} ->
        (query vectors, passage vectors)) and the `model` it calls, which encodes the probe in eval mode (no
        dropout: the probe's change is then the encoder's alone) and returns to its mode after. The change of the
        probe's mean query (passage) vector since the last call is added to every banked query (passage, hard
        negative), which the last call had brought up to date, so the whole bank follows the encoder's common
        move. Why: banked vectors left where they were let the encoder lower every banked negative's logit at once
        by moving all its vectors away from them (measured from scratch: README, "the bank makes the encoder flee
        its own past"); a common shift is what a full refresh corrects for 2 x N_mem forward passes, this for
        2 x the probe's pairs.
        With a global bank every process encodes its own probe and the means are averaged across processes."""
        if self.drift_probe is None:
            return
        was_training = model.training
        model.eval()
        try:
            queries, passages = encode(self.drift_probe)
        finally:
            model.train(was_training)
        means = torch.stack([self._prepare(queries).mean(0), self._prepare(passages).mean(0)])
        if self._bank_processes()[1] > 1:  # one shift for the one global bank, the same on every process
            means = gather_without_grad(means[None]).mean(0)
        bank = self.bank
        if self.drift_means is not None and bank.fill:
            shift = (means - self.drift_means).to(bank.queries.dtype)
            moved = [(bank.queries[:bank.fill], shift[0]), (bank.passages[:bank.fill], shift[1])]
            if bank.num_hard_negatives:
                moved.append((bank.hard_negatives[:bank.fill], shift[1]))
            for vectors, step in moved:
                vectors += step
                if self.similarity == "cos":
                    vectors.copy_(F.normalize(vectors, dim=-1))
            self.bank_lse.stale = True
        self.drift_means = means

    def reset(self) -> None:
        """Empty the bank (e.g. after every optimizer step, for an ablation)."""
        self.bank.reset()
        self.bank_lse.stale = True

    def move_bank_to(self, device) -> None:
        """The bank and its cache on `device` (a bank restored from a checkpoint starts on the CPU)."""
        if self.bank.queries is not None and self.bank.queries.device != device:
            self.bank.to(device)
            self.bank_lse.to(device)
        if self.drift_means is not None and self.drift_means.device != device:
            self.drift_means = self.drift_means.to(device)
            self.drift_probe = {side: {k: t.to(device) for k, t in f.items()} for side, f in self.drift_probe.items()}

    def _anonymous_keys(self, shape, device, rank, size):
        """Negative ids, unique across micro-batches and ranks: never equal to each other or to a real key."""
        count = math.prod(shape)
        ids = self._anonymous_keys_used + torch.arange(count, device=device)
        self._anonymous_keys_used += count
        return (-1 - (ids * size + rank)).view(*shape)

    def start_step(self, global_step: int) -> None:
        """Call before each optimizer step (global_step = steps done): ends the bank warm-up on time."""
        self.read_bank = global_step >= self.bank_warmup_steps

    def defer_finite_check_to_step(self) -> None:
        """For a training loop that calls check_finite() before every optimizer step (both trainers' callbacks,
        at train begin): finiteness is then read once per step, not once per micro-batch. Not under DeepSpeed,
        which applies the step inside the last micro-batch's backward, before any such call."""
        self.defer_finite_check = deepspeed_zero_stage() is None

    def check_finite(self) -> None:
        """With defer_finite_check: call before each optimizer step; raises FloatingPointError if a training
        micro-batch since the last call had a non-finite loss, so that step is never applied."""
        total, self._loss_sum = self._loss_sum, None
        if total is not None and not bool(torch.isfinite(total)):
            raise _nonfinite_loss_error()

    # -- diagnostics (kept on the device; read at logging steps and once per optimizer step) ----
    def check_collapse(self, patience: int) -> None:
        """Call once per optimizer step; raises EmbeddingCollapseError (see diagnostics.py)."""
        self.diagnostics.check_collapse(patience)

    def pop_log_stats(self) -> dict:
        """Means since the last call: negatives per query, GradNormRatio; and the bank fill."""
        return self.diagnostics.pop(self.bank.fill)

    # -- checkpoints ---------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"bank": self.bank.state_dict(), "lse_cache": self.bank_lse.state_dict(),
                "query_bank_size": self.query_bank_size, "drift_probe": self.drift_probe,
                "drift_means": self.drift_means}

    def set_extra_state(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])  # refuses another capacity, naming the setting
        if state["query_bank_size"] != self.query_bank_size:
            raise ValueError(f"checkpointed query bank has {state['query_bank_size']} entries, this run asks for "
                             f"{self.query_bank_size}: resume with the same query_memory_bank_size")
        self.bank_lse.load_state_dict(state["lse_cache"])
        self.drift_probe, self.drift_means = state.get("drift_probe"), state.get("drift_means")  # (older: none)

    def save_checkpoint(self, directory: str, rank: int = 0, **metadata) -> str:
        """Write this process's bank (and its cache) to `directory`; returns the file."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, BANK_FILE.format(rank=rank))
        torch.save({"state": self.state_dict(), **metadata}, path)
        return path

    def load_checkpoint(self, directory: str, rank: int = 0) -> dict:
        """Restore the bank written by `save_checkpoint`; returns the metadata saved with it."""
        path = os.path.join(directory, BANK_FILE.format(rank=rank))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint has no memory bank state, so the run cannot continue exactly. "
                "Resume from a checkpoint written with the bank (ContAccumTrainer, or sentence-transformers with "
                "hf_contaccum's ContAccumBankCallback), or start without resume_from_checkpoint")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(saved.pop("state"))
        self.restored_step = saved.get("global_step")
        return saved


def check_bank_updates(refresh_steps: int, drift_probe: int, bank_size: int, bank_hard_negatives: bool) -> None:
    """bank_refresh_steps and bank_drift_probe change banked vectors, so they need a bank; the refresh re-encodes
    only banked queries and positives; with a full refresh the probe would have nothing to correct."""
    for name, value in (("bank_refresh_steps", refresh_steps), ("bank_drift_probe", drift_probe)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0 = off), got {value}")
        if value and bank_size == 0:
            raise ValueError(f"{name} updates the memory bank, and memory_bank_size is 0: give the bank a size, or "
                             f"set {name}=0")
    if refresh_steps and bank_hard_negatives:
        raise ValueError("bank_refresh_steps re-encodes banked queries and positives, not banked hard negatives: "
                         "set bank_hard_negatives=False or bank_refresh_steps=0")
    if refresh_steps and drift_probe:
        raise ValueError("bank_drift_probe and bank_refresh_steps are two staleness controls for the same thing (a "
                         "refresh re-encodes the whole bank, the probe estimates the common drift from a few pairs): "
                         "set one of them to 0")


def check_bank_fits(capacity: int, per_process: int, processes: int = 1) -> None:
    """A bank smaller than one (gathered) micro-batch would be overwritten before anything reads it."""
    rows = per_process * processes
    if 0 < capacity < rows:
        where = f" ({processes} processes x {per_process})" if processes > 1 else ""
        raise ValueError(
            f"memory_bank_size={capacity} is smaller than one micro-batch of {rows} pairs{where}: each micro-batch "
            f"would overwrite the bank before anything reads it. Use memory_bank_size >= {rows} (about N_total, the "
            "pairs of one optimizer step, is a good start) or 0 for plain gradient accumulation")


def _check_inputs(queries, positives, positive_keys, hard_negatives, hard_negative_keys) -> None:
    n = queries.shape[0]
    if queries.dim() != 2 or positives.dim() != 2 or positives.shape != queries.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must both be "
                         "(n, d): one positive per query")
    if positive_keys is not None and tuple(positive_keys.shape) != (n,):
        raise ValueError(f"positive_keys has shape {tuple(positive_keys.shape)}, expected ({n},)")
    if hard_negatives is not None:
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != n or hard_negatives.shape[2] != queries.shape[1]:
            raise ValueError(f"hard_negatives has shape {tuple(hard_negatives.shape)}, expected ({n}, H, "
                             f"{queries.shape[1]}): H hard negatives per query")
        if hard_negative_keys is not None and tuple(hard_negative_keys.shape) != tuple(hard_negatives.shape[:2]):
            raise ValueError(f"hard_negative_keys has shape {tuple(hard_negative_keys.shape)}, expected "
                             f"{tuple(hard_negatives.shape[:2])}")

"""The ContAccum loss (design.md §2) with an incrementally kept bank x bank block (§6).

Rows are the current queries and the banked queries; columns are the current positives,
the current hard negatives, the banked positives and (optionally) the banked hard
negatives. Every banked vector is a constant, so:

* current rows need autograd through the current query and all current columns;
* banked rows need autograd only through the current columns; what they need of the
  banked columns is one constant per row: the log-sum-exp of their logits over them.

That constant is kept per (banked row, chunk of bank slots). When a micro-batch is
enqueued only the written rows and the touched chunks are recomputed (about
4 * N_local * N_mem * d flops instead of 2 * N_mem^2 * d), and a row's total is a
log-sum-exp over its chunks: exact, and never a subtraction of exponentials.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bank import MemoryBank

SIMILARITIES = ("dot", "cos")
NEG_INF = float("-inf")


def bank_columns(bank: MemoryBank, first: int = 0, last: int | None = None):
    """Banked column vectors (S, 1+H, d) and keys (S, 1+H) of slots [first, last) (default: the valid ones).

    Without banked hard negatives these are views; with them only the requested slots are copied."""
    slots = slice(first, bank.fill if last is None else last)
    vecs, keys = bank.passages[slots, None], bank.passage_keys[slots, None]
    if bank.num_hard_negatives:
        vecs = torch.cat([vecs, bank.hard_negatives[slots]], 1)
        keys = torch.cat([keys, bank.hard_negative_keys[slots]], 1)
    return vecs, keys


class BankLogsumexp:
    """For every banked row, the log-sum-exp of its logits over all banked columns.

    Kept as a two-level tree so that one enqueue touches little: per row, one value per
    chunk of `chunk_size` slots, and one per group of ~sqrt(#chunks) chunks. An enqueue
    recomputes the written rows against every slot, and every valid row against the
    touched chunks; a row's total is a log-sum-exp over its groups.
    """

    ROW_BLOCK = 512  # rows per matmul when rebuilding, to bound temporary memory

    def __init__(self, chunk_size: int = 16):
        self.chunk_size = chunk_size
        self.chunk_lse: torch.Tensor | None = None  # (capacity, num_chunks), fp32
        self.group_lse: torch.Tensor | None = None  # (capacity, num_groups), fp32
        self.stale = True

    def _slot_lse(self, bank, rows, first, last, temperature, mask_false_negatives):
        """(R, last-first): per row, log-sum-exp over the 1+H columns of each slot in [first, last)."""
        vecs, keys = bank_columns(bank, first, last)
        num_slots, width = keys.shape
        queries = bank.queries[rows]
        logits = (queries @ vecs.flatten(0, 1).T).view(-1, num_slots, width) / temperature
        slots = torch.arange(first, last, device=keys.device)
        drop = (slots >= bank.fill)[None, :, None]
        if mask_false_negatives:  # a column with the row's positive key, other than that positive itself
            row_slots = torch.arange(rows.start, rows.stop, device=keys.device) if isinstance(rows, slice) else rows
            own = (row_slots[:, None] == slots[None])[..., None] & (torch.arange(width, device=keys.device) == 0)
            drop = drop | ((keys[None] == bank.passage_keys[rows][:, None, None]) & ~own)
        return logits.masked_fill(drop, NEG_INF).logsumexp(-1)

    @staticmethod
    def _grouped_lse(values, group):
        """Log-sum-exp over consecutive groups of `group` columns (last group padded)."""
        rows, cols = values.shape
        pad = -cols % group
        if pad:
            values = torch.cat([values, values.new_full((rows, pad), NEG_INF)], 1)
        return values.view(rows, -1, group).logsumexp(-1)

    def _refresh_rows(self, bank, rows, temperature, mask):
        self.chunk_lse[rows] = self._grouped_lse(self._slot_lse(bank, rows, 0, bank.capacity, temperature, mask),
                                                 self.chunk_size)
        self.group_lse[rows] = self._grouped_lse(self.chunk_lse[rows], self.group_size)

    @torch.no_grad()
    def update(self, bank: MemoryBank, written: torch.Tensor, temperature: float, mask: bool) -> None:
        device = bank.queries.device
        if self.stale:  # first use, reset or resume: rebuild from the bank itself
            num_chunks = -(-bank.capacity // self.chunk_size)
            self.group_size = max(1, int(num_chunks ** 0.5))
            self.chunk_lse = torch.full((bank.capacity, num_chunks), NEG_INF, device=device)
            self.group_lse = torch.full((bank.capacity, -(-num_chunks // self.group_size)), NEG_INF, device=device)
            for start in range(0, bank.fill, self.ROW_BLOCK):
                self._refresh_rows(bank, slice(start, min(start + self.ROW_BLOCK, bank.fill)), temperature, mask)
            self.stale = False
            return
        if len(written) == 0:
            return
        written = written.to(device)
        self._refresh_rows(bank, written, temperature, mask)
        valid = slice(0, bank.fill)
        c, g = self.chunk_size, self.group_size
        for chunk in torch.unique(written // c).tolist():
            first, last = chunk * c, min(chunk * c + c, bank.capacity)
            self.chunk_lse[valid, chunk] = self._slot_lse(bank, valid, first, last, temperature, mask).logsumexp(-1)
        for group in torch.unique(written // (c * g)).tolist():
            self.group_lse[valid, group] = self.chunk_lse[valid, group * g:(group + 1) * g].logsumexp(-1)

    def row_lse(self, rows) -> torch.Tensor:
        return self.group_lse[rows].logsumexp(-1)


@dataclass
class LossStats:
    num_rows: int  # loss rows: current queries + banked queries
    num_columns: int  # candidate passages per row (negatives per query = this - 1)


class ContAccumLoss:
    """InfoNCE over [current ; banked] queries x [current ; banked] passages.

    `query_bank_size` <= `passage_bank_size`: a banked query row needs its aligned banked
    positive as a column. `query_bank_size=0` gives pre-batch negatives, both 0 plain
    in-batch InfoNCE (and so, under accumulation, plain gradient accumulation).
    """

    def __init__(self, query_bank_size=0, passage_bank_size=0, temperature=1.0, similarity="dot",
                 bank_hard_negatives=False, mask_false_negatives=True, chunk_size=16):
        if query_bank_size < 0 or passage_bank_size < 0:
            raise ValueError("memory bank sizes are numbers of samples and must be >= 0 (0 disables the bank)")
        if query_bank_size > passage_bank_size:
            raise ValueError(
                f"query_memory_bank_size ({query_bank_size}) > passage_memory_bank_size ({passage_bank_size}): "
                "a banked query needs its banked positive as a column; make the passage bank at least as large"
            )
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.query_bank_size = query_bank_size
        self.temperature = float(temperature)
        self.similarity = similarity
        self.mask_false_negatives = mask_false_negatives
        self.bank = MemoryBank(passage_bank_size, bank_hard_negatives)
        self.bank_lse = BankLogsumexp(chunk_size)

    def _prepare(self, x):
        x = x.float()  # logits and log-sum-exp in fp32, whatever the encoder's autocast dtype
        return F.normalize(x, dim=-1) if self.similarity == "cos" else x

    def __call__(self, queries, passages, passage_keys, hard_negatives=None, hard_negative_keys=None,
                 use_bank=True, rank=0, world_size=1):
        """Mean InfoNCE over all rows; differentiable in the current vectors.

        Single process: queries (n, d), passages (n, d), hard_negatives (n, H, d) or None.
        Distributed (world_size R): queries are this rank's n; passages, hard negatives and
        keys are gathered from all ranks in rank order (R*n rows), so query i's positive is
        passages[rank*n + i]. Each rank counts its own query rows and every R-th banked row;
        the result is scaled by R so that DDP's gradient average gives the gradient of the
        one global mean over R*n + N_mem rows.
        """
        q, p = self._prepare(queries), self._prepare(passages)
        n = q.shape[0]
        cols, keys = [p], [passage_keys]
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            cols.append(self._prepare(hard_negatives).flatten(0, 1))
            keys.append(hard_negative_keys.flatten())
        cur_cols, cur_keys = torch.cat(cols), torch.cat(keys)
        bank = self.bank
        banked = use_bank and bank.fill > 0
        targets = torch.arange(n, device=q.device) + rank * n
        logits, all_keys = q @ cur_cols.T, cur_keys
        if banked:  # banked columns: separate matmul, so the bank is read in place, never copied
            bvecs, bkeys = bank_columns(bank)
            logits = torch.cat([logits, q @ bvecs.flatten(0, 1).T], 1)
            all_keys = torch.cat([cur_keys, bkeys.flatten()])
        logits = logits / self.temperature
        if self.mask_false_negatives:
            same = all_keys[None] == passage_keys[targets][:, None]
            same[torch.arange(n), targets] = False
            logits = logits.masked_fill(same, NEG_INF)
        total = F.cross_entropy(logits, targets, reduction="sum")
        num_rows = n * world_size  # every rank's current rows count in the global mean

        if banked and self.query_bank_size > 0:
            if self.query_bank_size >= bank.fill:
                rows = slice(rank, bank.fill, world_size)  # a slice reads the bank without a copy
                total_bank_rows = bank.fill
            else:
                newest = bank.newest(self.query_bank_size)
                rows, total_bank_rows = newest[rank::world_size], len(newest)
            num_bank_rows = len(range(*rows.indices(bank.capacity))) if isinstance(rows, slice) else len(rows)
            num_rows += total_bank_rows - num_bank_rows  # other ranks' share of the banked rows
            if num_bank_rows:
                if self.bank_lse.stale:
                    self.bank_lse.update(bank, torch.empty(0, dtype=torch.long), self.temperature,
                                         self.mask_false_negatives)
                bq = bank.queries[rows]
                cur_logits = bq @ cur_cols.T / self.temperature
                if self.mask_false_negatives:
                    cur_logits = cur_logits.masked_fill(cur_keys[None] == bank.passage_keys[rows][:, None], NEG_INF)
                lse = torch.logaddexp(cur_logits.logsumexp(-1), self.bank_lse.row_lse(rows))
                target = (bq * bank.passages[rows]).sum(-1) / self.temperature
                total = total + (lse - target).sum()
                num_rows += num_bank_rows
        stats = LossStats(num_rows, logits.shape[1])
        return total * world_size / num_rows, stats

    @torch.no_grad()
    def enqueue(self, queries, passages, passage_keys, hard_negatives=None, hard_negative_keys=None):
        if self.bank.capacity == 0:
            return
        hn = self._prepare(hard_negatives.detach()) if hard_negatives is not None else None
        written = self.bank.enqueue(self._prepare(queries.detach()), self._prepare(passages.detach()), passage_keys,
                                    hn, hard_negative_keys)
        if self.query_bank_size > 0:
            self.bank_lse.update(self.bank, written, self.temperature, self.mask_false_negatives)

    def reset(self):
        self.bank.reset()
        self.bank_lse.stale = True

    def state_dict(self):
        state = self.bank.state_dict()
        # The log-sum-exp cache is derived from the bank, but a rebuild sums in another order than the
        # incremental updates did: keeping it makes a resumed run bitwise equal to an uninterrupted one.
        if not self.bank_lse.stale:
            state["lse_cache"] = {"chunk_size": self.bank_lse.chunk_size, "group_size": self.bank_lse.group_size,
                                  "chunk_lse": self.bank_lse.chunk_lse.cpu(), "group_lse": self.bank_lse.group_lse.cpu()}
        return state

    def load_state_dict(self, state, device=None):
        self.bank.load_state_dict(state, device)
        cache = state.get("lse_cache")
        self.bank_lse.stale = cache is None or cache["chunk_size"] != self.bank_lse.chunk_size
        if not self.bank_lse.stale:
            self.bank_lse.group_size = cache["group_size"]
            self.bank_lse.chunk_lse = cache["chunk_lse"].to(device or "cpu")
            self.bank_lse.group_lse = cache["group_lse"].to(device or "cpu")

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


def bank_columns(bank: MemoryBank, count: int | None = None):
    """Banked column vectors (count, 1+H, d) and keys (count, 1+H) of slots [0, count)."""
    count = bank.fill if count is None else count
    vecs, keys = bank.passages[:count, None], bank.passage_keys[:count, None]
    if bank.num_hard_negatives:
        vecs = torch.cat([vecs, bank.hard_negatives[:count]], 1)
        keys = torch.cat([keys, bank.hard_negative_keys[:count]], 1)
    return vecs, keys


class BankLogsumexp:
    """For every banked row, the log-sum-exp of its logits over all banked columns."""

    ROW_BLOCK = 512  # rows per matmul when rebuilding, to bound temporary memory

    def __init__(self, chunk_size: int = 64):
        self.chunk_size = chunk_size
        self.chunk_lse: torch.Tensor | None = None  # (capacity, num_chunks), fp32
        self.stale = True

    def _block_lse(self, bank, rows, slots, temperature, mask_false_negatives):
        """(len(rows), len(slots)): log-sum-exp over the 1+H columns of each slot."""
        vecs, keys = bank_columns(bank, bank.capacity)
        vecs, keys = vecs[slots].float(), keys[slots]
        logits = torch.einsum("rd,shd->rsh", bank.queries[rows].float(), vecs) / temperature
        drop = (slots >= bank.fill)[None, :, None].expand_as(logits)
        if mask_false_negatives:  # a column with the row's positive key, other than that positive itself
            is_positive = torch.zeros_like(keys, dtype=torch.bool)
            is_positive[:, 0] = True
            own = (rows[:, None] == slots[None, :])[..., None] & is_positive[None]
            drop = drop | ((keys[None] == bank.passage_keys[rows][:, None, None]) & ~own)
        return logits.masked_fill(drop, NEG_INF).logsumexp(-1)

    def _rows_all_chunks(self, bank, rows, temperature, mask):
        c, cap = self.chunk_size, bank.capacity
        num_chunks = self.chunk_lse.shape[1]
        slots = torch.arange(num_chunks * c, device=rows.device)
        lse = self._block_lse(bank, rows, slots.clamp(max=cap - 1), temperature, mask)
        lse = lse.masked_fill((slots >= cap)[None], NEG_INF)  # padding slots of the last chunk
        self.chunk_lse[rows] = lse.view(len(rows), num_chunks, c).logsumexp(-1)

    @torch.no_grad()
    def update(self, bank: MemoryBank, written: torch.Tensor, temperature: float, mask: bool) -> None:
        device = bank.queries.device
        if self.stale:  # first use, reset or resume: rebuild from the bank itself
            num_chunks = -(-bank.capacity // self.chunk_size)
            self.chunk_lse = torch.full((bank.capacity, num_chunks), NEG_INF, device=device)
            for start in range(0, bank.fill, self.ROW_BLOCK):
                rows = torch.arange(start, min(start + self.ROW_BLOCK, bank.fill), device=device)
                self._rows_all_chunks(bank, rows, temperature, mask)
            self.stale = False
            return
        if len(written) == 0:
            return
        written = written.to(device)
        self._rows_all_chunks(bank, written, temperature, mask)
        valid_rows = torch.arange(bank.fill, device=device)
        for chunk in torch.unique(written // self.chunk_size).tolist():
            start = chunk * self.chunk_size
            slots = torch.arange(start, min(start + self.chunk_size, bank.capacity), device=device)
            self.chunk_lse[valid_rows, chunk] = self._block_lse(bank, valid_rows, slots, temperature, mask).logsumexp(-1)

    def row_lse(self, rows: torch.Tensor) -> torch.Tensor:
        return self.chunk_lse[rows].logsumexp(-1)


@dataclass
class LossStats:
    num_rows: int  # loss rows: current queries + banked queries
    num_columns: int  # candidate passages per row (negatives per query = this - 1)
    bank_fill: int


class ContAccumLoss:
    """InfoNCE over [current ; banked] queries x [current ; banked] passages.

    `query_bank_size` <= `passage_bank_size`: a banked query row needs its aligned banked
    positive as a column. `query_bank_size=0` gives pre-batch negatives, both 0 plain
    in-batch InfoNCE (and so, under accumulation, plain gradient accumulation).
    """

    def __init__(self, query_bank_size=0, passage_bank_size=0, temperature=1.0, similarity="dot",
                 bank_hard_negatives=False, mask_false_negatives=True, chunk_size=64):
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
                 use_bank=True, target_offset=0, bank_rows=None):
        """Mean InfoNCE over all rows; differentiable in the current vectors.

        queries (n, d); passages (N, d) with N >= n (N > n when positives were gathered from
        other processes; query i's positive is passages[target_offset + i]); hard_negatives
        (N, H, d) or None. `bank_rows` restricts the banked query rows this call counts
        (distributed: each process takes a share), default all.
        """
        q, p = self._prepare(queries), self._prepare(passages)
        n, num_cur = q.shape[0], p.shape[0]
        cols, keys = [p], [passage_keys]
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            cols.append(self._prepare(hard_negatives).flatten(0, 1))
            keys.append(hard_negative_keys.flatten())
        cur_cols, cur_keys = torch.cat(cols), torch.cat(keys)
        bank = self.bank
        banked = use_bank and bank.fill > 0
        if banked:
            bvecs, bkeys = bank_columns(bank)
            all_cols = torch.cat([cur_cols, bvecs.flatten(0, 1).float()])
            all_keys = torch.cat([cur_keys, bkeys.flatten()])
        else:
            all_cols, all_keys = cur_cols, cur_keys
        targets = torch.arange(n, device=q.device) + target_offset

        logits = q @ all_cols.T / self.temperature
        if self.mask_false_negatives:
            same = all_keys[None] == passage_keys[targets][:, None]
            same[torch.arange(n), targets] = False
            logits = logits.masked_fill(same, NEG_INF)
        total = F.cross_entropy(logits, targets, reduction="sum")
        num_rows = n

        if banked and self.query_bank_size > 0:
            rows = bank.newest(self.query_bank_size) if bank_rows is None else bank_rows
            if len(rows):
                if self.bank_lse.stale:
                    self.bank_lse.update(bank, rows[:0], self.temperature, self.mask_false_negatives)
                bq = bank.queries[rows].float()
                cur_logits = bq @ cur_cols.T / self.temperature
                if self.mask_false_negatives:
                    cur_logits = cur_logits.masked_fill(cur_keys[None] == bank.passage_keys[rows][:, None], NEG_INF)
                lse = torch.logaddexp(cur_logits.logsumexp(-1), self.bank_lse.row_lse(rows))
                target = (bq * bank.passages[rows].float()).sum(-1) / self.temperature
                total = total + (lse - target).sum()
                num_rows += len(rows)
        stats = LossStats(num_rows, all_cols.shape[0], bank.fill)
        return total / num_rows, stats

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
        return self.bank.state_dict()

    def load_state_dict(self, state, device=None):
        self.bank.load_state_dict(state, device)
        self.bank_lse.stale = True

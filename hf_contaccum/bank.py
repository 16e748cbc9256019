"""The dual memory bank and the log-sum-exp cache that lives on it.

`MemoryBank` is a pre-allocated FIFO ring buffer sized in samples: entry j holds a past
query vector, the positive passage vector aligned with it, and optionally that query's
hard-negative vectors, plus an int64 key per passage (used to mask false negatives).
Everything is stored detached: the bank never holds a graph.

`BankLogsumexp` keeps, for every banked query row, the log-sum-exp of its logits over
all banked columns (design.md §6): the only thing a banked row needs of the constant
bank x bank block, updated incrementally after each enqueue.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


class MemoryBank:
    """FIFO ring buffer of (query, positive, hard negatives) vectors.

    Storage is allocated lazily on the first `enqueue` (when the vector size, dtype and
    device are known) and never grows afterwards: the write pointer wraps around, which
    overwrites the oldest entries. Valid entries are always the slots ``[0, fill)``.
    """

    def __init__(self, capacity: int, keep_hard_negatives: bool = False):
        if capacity < 0:
            raise ValueError(f"memory bank capacity must be >= 0 samples, got {capacity}; use 0 to disable the bank")
        self.capacity = int(capacity)
        self.keep_hard_negatives = bool(keep_hard_negatives)
        self.num_hard_negatives = 0  # H per entry, fixed by the first enqueue when hard negatives are kept
        self.queries = self.passages = self.hard_negatives = None
        self.passage_keys = self.hard_negative_keys = None
        self.ptr = 0  # next slot to write
        self.fill = 0  # number of valid entries
        self.num_enqueued = 0  # total entries ever written (a step counter for resume checks)

    def __len__(self) -> int:
        return self.fill

    def _allocate(self, dim: int, dtype: torch.dtype, device: torch.device, num_hard_negatives: int) -> None:
        self.num_hard_negatives = num_hard_negatives if self.keep_hard_negatives else 0
        c, h = self.capacity, self.num_hard_negatives
        self.queries = torch.zeros(c, dim, dtype=dtype, device=device)
        self.passages = torch.zeros(c, dim, dtype=dtype, device=device)
        self.passage_keys = torch.zeros(c, dtype=torch.long, device=device)
        if h:
            self.hard_negatives = torch.zeros(c, h, dim, dtype=dtype, device=device)
            self.hard_negative_keys = torch.zeros(c, h, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, queries, passages, passage_keys, hard_negatives=None, hard_negative_keys=None) -> torch.Tensor:
        """Write a batch (oldest first), overwriting the oldest entries. Returns the slots written."""
        n = queries.shape[0]
        if self.capacity == 0 or n == 0:
            return torch.empty(0, dtype=torch.long)
        if passages.shape[0] != n or passage_keys.shape[0] != n:
            raise ValueError("queries, passages and passage_keys must have the same number of rows")
        batch_h = 0 if hard_negatives is None else hard_negatives.shape[1]
        if self.queries is None:
            self._allocate(queries.shape[1], queries.dtype, queries.device, batch_h)
        if self.keep_hard_negatives and batch_h != self.num_hard_negatives:  # fixed by the first batch, either way
            raise ValueError(
                f"this bank keeps {self.num_hard_negatives} hard negatives per entry (the first batch's number) but "
                f"this batch has {batch_h}; give every example the same number of hard negatives (max_hard_negatives "
                "can cut them to a common number) or set bank_hard_negatives=False"
            )
        if n > self.capacity:  # only the newest `capacity` rows survive a FIFO of that size
            newest = slice(n - self.capacity, n)
            queries, passages, passage_keys = queries[newest], passages[newest], passage_keys[newest]
            if hard_negatives is not None:
                hard_negatives, hard_negative_keys = hard_negatives[newest], hard_negative_keys[newest]
            self.num_enqueued += n - self.capacity
            n = self.capacity
        slots = (torch.arange(n) + self.ptr) % self.capacity
        dev_slots = slots.to(self.queries.device)
        self.queries.index_copy_(0, dev_slots, queries.detach().to(self.queries.dtype))
        self.passages.index_copy_(0, dev_slots, passages.detach().to(self.passages.dtype))
        self.passage_keys.index_copy_(0, dev_slots, passage_keys.to(self.passage_keys.device))
        if self.num_hard_negatives:
            h = self.num_hard_negatives
            self.hard_negatives.index_copy_(0, dev_slots, hard_negatives[:, :h].detach().to(self.hard_negatives.dtype))
            self.hard_negative_keys.index_copy_(0, dev_slots, hard_negative_keys[:, :h].to(self.passage_keys.device))
        self.ptr = (self.ptr + n) % self.capacity
        self.fill = min(self.fill + n, self.capacity)
        self.num_enqueued += n
        return slots

    def newest(self, count: int) -> torch.Tensor:
        """Slots of the `count` most recent valid entries, oldest first."""
        count = min(count, self.fill)
        return (torch.arange(self.ptr - count, self.ptr) % max(self.capacity, 1)).to(self._device())

    def _device(self):
        return self.queries.device if self.queries is not None else torch.device("cpu")

    def reset(self) -> None:
        self.ptr = self.fill = 0

    def to(self, device) -> MemoryBank:
        """Move the storage (e.g. a bank restored on the CPU, to the encoder's device)."""
        for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"capacity": self.capacity, "keep_hard_negatives": self.keep_hard_negatives,
                 "num_hard_negatives": self.num_hard_negatives,
                 "ptr": self.ptr, "fill": self.fill, "num_enqueued": self.num_enqueued}
        for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
            value = getattr(self, name)
            state[name] = None if value is None else value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict, device=None) -> None:
        if state["capacity"] != self.capacity or state["keep_hard_negatives"] != self.keep_hard_negatives:
            raise ValueError(
                f"checkpointed bank has capacity {state['capacity']} (hard negatives kept: "
                f"{state['keep_hard_negatives']}), this run asks for {self.capacity} ({self.keep_hard_negatives}): "
                "resume with the same memory_bank_size and bank_hard_negatives"
            )
        self.num_hard_negatives = state["num_hard_negatives"]
        self.ptr, self.fill, self.num_enqueued = state["ptr"], state["fill"], state["num_enqueued"]
        for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
            value = state[name]
            setattr(self, name, None if value is None else value.to(device or "cpu"))


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
    """For every banked row: the log-sum-exp of its logits over all banked columns, and its own
    positive's logit (both constants until the row or a column is overwritten).

    Kept as a two-level tree so that one enqueue touches little: per row, one value per
    chunk of `chunk_size` slots, and one per group of ~sqrt(#chunks) chunks. An enqueue
    recomputes the written rows against every slot, and every valid row against the
    touched chunks; a row's total is a log-sum-exp over its groups. Every recomputation runs
    in blocks of rows, so its temporaries stay small at any bank size.
    """

    MIN_CHUNK = 16
    CACHE_SHARE = 0.05  # default chunk: the cache holds at most ~5 % of the bank vectors' floats
    BLOCK_FLOATS = 2**21  # logits per temporary block (8 MiB in fp32)

    def __init__(self, chunk_size: int | None = None):
        self.requested_chunk_size = chunk_size  # None: auto_chunk_size
        self.chunk_size = chunk_size
        self.chunk_lse: torch.Tensor | None = None  # (capacity, num_chunks), fp32
        self.group_lse: torch.Tensor | None = None  # (capacity, num_groups), fp32
        self.positive_logit: torch.Tensor | None = None  # (capacity,), fp32: q_j . p_j / temperature
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

    def _blocks(self, rows, num_columns: int) -> list:
        """`rows` (a slice or an index tensor) in blocks whose logits against num_columns fit BLOCK_FLOATS."""
        step = max(1, self.BLOCK_FLOATS // max(num_columns, 1))
        if isinstance(rows, slice):
            return [slice(s, min(s + step, rows.stop)) for s in range(rows.start, rows.stop, step)]
        return [rows[s:s + step] for s in range(0, len(rows), step)]

    @staticmethod
    def _grouped_lse(values, group):
        """Log-sum-exp over consecutive groups of `group` columns (last group padded)."""
        rows, cols = values.shape
        pad = -cols % group
        if pad:
            values = torch.cat([values, values.new_full((rows, pad), NEG_INF)], 1)
        return values.view(rows, -1, group).logsumexp(-1)

    def _refresh_rows(self, bank, rows, temperature, mask):
        width = 1 + bank.num_hard_negatives
        for block in self._blocks(rows, bank.capacity * width):
            self.chunk_lse[block] = self._grouped_lse(
                self._slot_lse(bank, block, 0, bank.capacity, temperature, mask), self.chunk_size)
            self.group_lse[block] = self._grouped_lse(self.chunk_lse[block], self.group_size)
            self.positive_logit[block] = (bank.queries[block] * bank.passages[block]).sum(-1) / temperature

    @torch.no_grad()
    def update(self, bank: MemoryBank, written: torch.Tensor, temperature: float, mask: bool) -> None:
        device = bank.queries.device
        if self.stale:  # first use, reset or resume: rebuild from the bank itself
            self.chunk_size = self.requested_chunk_size or self.auto_chunk_size(bank.capacity, bank.queries.shape[1])
            num_chunks = -(-bank.capacity // self.chunk_size)
            self.group_size = max(1, int(num_chunks ** 0.5))
            self.chunk_lse = torch.full((bank.capacity, num_chunks), NEG_INF, device=device)
            self.group_lse = torch.full((bank.capacity, -(-num_chunks // self.group_size)), NEG_INF, device=device)
            self.positive_logit = torch.zeros(bank.capacity, device=device)
            self._refresh_rows(bank, slice(0, bank.fill), temperature, mask)
            self.stale = False
            return
        if len(written) == 0:
            return
        written = written.to(device)
        self._refresh_rows(bank, written, temperature, mask)
        valid = slice(0, bank.fill)
        c, g = self.chunk_size, self.group_size
        width = 1 + bank.num_hard_negatives
        for chunk in torch.unique(written // c).tolist():
            first, last = chunk * c, min(chunk * c + c, bank.capacity)
            for block in self._blocks(valid, (last - first) * width):
                self.chunk_lse[block, chunk] = self._slot_lse(bank, block, first, last, temperature,
                                                              mask).logsumexp(-1)
        for group in torch.unique(written // (c * g)).tolist():
            self.group_lse[valid, group] = self.chunk_lse[valid, group * g:(group + 1) * g].logsumexp(-1)

    @classmethod
    def auto_chunk_size(cls, capacity: int, dim: int) -> int:
        """Chunks of at least N_mem / (d / 10) slots: the cache then holds about d / 10 floats per banked row,
        ~5 % of the 2d of the row's own query and passage vectors, at any bank size (for d < 20 it cannot go
        below the one chunk and one group it needs). The price: an enqueue refreshes (N_local + chunk) x N_mem
        x d multiply-adds instead of (N_local + 16) x N_mem x d (at N_mem 65,536, d 768: 44 G instead of 1.3 G)."""
        return max(cls.MIN_CHUNK, -(-capacity // max(1, int(2 * dim * cls.CACHE_SHARE))))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.chunk_lse, self.group_lse, self.positive_logit)
                   if t is not None)

    def row_lse(self, rows) -> torch.Tensor:
        return self.group_lse[rows].logsumexp(-1)

    def row_positive_logit(self, rows) -> torch.Tensor:
        return self.positive_logit[rows]

    def to(self, device) -> BankLogsumexp:
        if self.chunk_lse is not None:
            self.chunk_lse, self.group_lse = self.chunk_lse.to(device), self.group_lse.to(device)
            self.positive_logit = self.positive_logit.to(device)
        return self

    # The cache is derived from the bank, but a rebuild sums in another order than the incremental
    # updates did: checkpointing it makes a resumed run bitwise equal to an uninterrupted one.
    def state_dict(self) -> dict | None:
        if self.stale:
            return None
        return {"chunk_size": self.chunk_size, "group_size": self.group_size, "chunk_lse": self.chunk_lse.cpu(),
                "group_lse": self.group_lse.cpu(), "positive_logit": self.positive_logit.cpu()}

    def load_state_dict(self, state: dict | None) -> None:
        # a checkpoint from before positive_logit was cached: rebuild the cache from the bank
        self.stale = state is None or "positive_logit" not in state or self.requested_chunk_size not in (
            None, state["chunk_size"])
        if not self.stale:
            self.chunk_size, self.group_size = state["chunk_size"], state["group_size"]
            self.chunk_lse, self.group_lse = state["chunk_lse"], state["group_lse"]
            self.positive_logit = state["positive_logit"]

"""MemoryBank: the dual FIFO memory bank, a pre-allocated ring buffer sized in samples.

Entry j holds a past query vector, the positive passage vector aligned with it and, when
hard negatives are banked, that query's hard-negative vectors, with an int64 key per passage
(equal keys: the same passage, never a negative of a query it is relevant to). Everything is
stored detached: the bank never holds a graph. As in MoCo's queue, the storage is allocated
once and written in place; unlike it, any batch size works (the pointer wraps around).
"""
from __future__ import annotations

import torch

VECTORS = ("queries", "passages", "hard_negatives")
KEYS = ("passage_keys", "hard_negative_keys")
BYTES_PER_FLOAT = 4


def bank_bytes(size: int, dim: int, banked_hard_negatives: int = 0) -> int:
    """Bytes a bank of `size` entries of width `dim` needs: its vectors and keys, plus its log-sum-exp cache
    (about 5 % of the vectors, docs/how-it-works.md#the-log-sum-exp-cache)."""
    columns = 2 + banked_hard_negatives
    vectors = size * columns * dim * BYTES_PER_FLOAT
    return int(vectors * 1.05) + size * (1 + banked_hard_negatives) * 8


class MemoryBank:
    """FIFO ring buffer of (query, positive, hard negatives) vectors; valid entries are the slots [0, fill).

    Storage is allocated on the first `enqueue`, when the width, dtype and device are known, and never
    grows: the write pointer wraps around and overwrites the oldest entries."""

    def __init__(self, size: int, keep_hard_negatives: bool = False):
        if size < 0:
            raise ValueError(f"memory_bank_size must be >= 0 samples, got {size}; use 0 to disable the bank")
        self.size = int(size)
        self.keep_hard_negatives = bool(keep_hard_negatives)
        self.num_hard_negatives = 0  # H per entry, fixed by the first enqueue when hard negatives are kept
        self.queries = self.passages = self.hard_negatives = None
        self.passage_keys = self.hard_negative_keys = None
        self.ptr = 0  # next slot to write
        self.fill = 0  # number of valid entries
        self.num_enqueued = 0  # entries ever written (a bank's age, for logs and tests)

    def __len__(self) -> int:
        return self.fill

    @property
    def capacity(self) -> int:
        import warnings
        warnings.warn("MemoryBank.capacity is now MemoryBank.size", FutureWarning, stacklevel=2)
        return self.size

    @property
    def dim(self) -> int | None:
        return None if self.queries is None else self.queries.shape[1]

    def _allocate(self, dim: int, dtype: torch.dtype, device: torch.device, num_hard_negatives: int) -> None:
        from .memory import (
            check_fits,  # here, not at import: the estimate reads the device's free memory
        )

        self.num_hard_negatives = num_hard_negatives if self.keep_hard_negatives else 0
        s, h = self.size, self.num_hard_negatives
        check_fits(bank_bytes(s, dim, h), device, f"memory_bank_size={s} (vectors of width {dim}"
                                                  f"{f', {h} banked hard negatives each' if h else ''})")
        self.queries = torch.zeros(s, dim, dtype=dtype, device=device)
        self.passages = torch.zeros(s, dim, dtype=dtype, device=device)
        self.passage_keys = torch.zeros(s, dtype=torch.long, device=device)
        if h:
            self.hard_negatives = torch.zeros(s, h, dim, dtype=dtype, device=device)
            self.hard_negative_keys = torch.zeros(s, h, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, queries, passages, passage_keys, hard_negatives=None, hard_negative_keys=None) -> tuple[int, int]:
        """Write a batch (oldest first) over the oldest entries. Returns (first slot, count): the slots written
        are first, first + 1, ... modulo the size."""
        n = queries.shape[0]
        if self.size == 0 or n == 0:
            return self.ptr, 0
        if passages.shape[0] != n or passage_keys.shape[0] != n:
            raise ValueError("queries, passages and passage_keys must have the same number of rows")
        batch_h = 0 if hard_negatives is None else hard_negatives.shape[1]
        if self.queries is None:
            self._allocate(queries.shape[1], queries.dtype, queries.device, batch_h)
        if queries.shape[1] != self.queries.shape[1]:
            raise ValueError(f"vectors of width {queries.shape[1]} for a bank of width {self.queries.shape[1]}: "
                             "one bank holds vectors of one width (MatryoshkaLoss gets one bank per width)")
        if self.keep_hard_negatives and batch_h != self.num_hard_negatives:  # fixed by the first batch, either way
            raise ValueError(
                f"this bank keeps {self.num_hard_negatives} hard negatives per entry (the first batch's number) but "
                f"this batch has {batch_h}; give every example the same number of hard negatives (max_hard_negatives "
                "can cut them to a common number) or set bank_hard_negatives=False")
        if n > self.size:  # only the newest `size` rows survive a FIFO of that size
            newest = slice(n - self.size, n)
            queries, passages, passage_keys = queries[newest], passages[newest], passage_keys[newest]
            if hard_negatives is not None:
                hard_negatives, hard_negative_keys = hard_negatives[newest], hard_negative_keys[newest]
            self.num_enqueued += n - self.size
            n = self.size
        first = self.ptr
        # a slice where the write does not wrap around: a copy, with no index to make on the device
        slots = slice(first, first + n) if first + n <= self.size else self.slots(first, n, self.queries.device)
        self.queries[slots] = queries.detach().to(self.queries.dtype)
        self.passages[slots] = passages.detach().to(self.passages.dtype)
        self.passage_keys[slots] = passage_keys.to(self.passage_keys.device)
        if self.num_hard_negatives:
            h = self.num_hard_negatives
            self.hard_negatives[slots] = hard_negatives[:, :h].detach().to(self.hard_negatives.dtype)
            self.hard_negative_keys[slots] = hard_negative_keys[:, :h].to(self.passage_keys.device)
        self.ptr = (self.ptr + n) % self.size
        self.fill = min(self.fill + n, self.size)
        self.num_enqueued += n
        return first, n

    def slots(self, first: int, count: int, device) -> torch.Tensor:
        """Slots first, first + 1, ... (count of them, modulo the size) as an index made on `device`: an index
        made on the host would be copied there, a host sync on a GPU."""
        return (torch.arange(count, device=device) + first) % self.size

    def newest(self, count: int) -> torch.Tensor:
        """Slots of the `count` most recent valid entries, oldest first."""
        count = min(count, self.fill)
        device = self.queries.device if self.queries is not None else torch.device("cpu")
        return torch.arange(self.ptr - count, self.ptr, device=device) % max(self.size, 1)

    def columns(self, first: int = 0, last: int | None = None):
        """Banked column vectors (S, 1+H, d) and keys (S, 1+H) of slots [first, last) (default: the valid ones).
        Without banked hard negatives these are views; with them only the requested slots are copied."""
        slots = slice(first, self.fill if last is None else last)
        vecs, keys = self.passages[slots, None], self.passage_keys[slots, None]
        if self.num_hard_negatives:
            vecs = torch.cat([vecs, self.hard_negatives[slots]], 1)
            keys = torch.cat([keys, self.hard_negative_keys[slots]], 1)
        return vecs, keys

    def reset(self) -> None:
        self.ptr = self.fill = 0

    def to(self, device) -> MemoryBank:
        """Move the storage (e.g. a bank restored on the CPU, to the encoder's device)."""
        for name in VECTORS + KEYS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"size": self.size, "keep_hard_negatives": self.keep_hard_negatives,
                 "num_hard_negatives": self.num_hard_negatives,
                 "ptr": self.ptr, "fill": self.fill, "num_enqueued": self.num_enqueued}
        for name in VECTORS + KEYS:
            value = getattr(self, name)
            state[name] = None if value is None else value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["keep_hard_negatives"] != self.keep_hard_negatives:
            raise ValueError(
                f"the saved bank has memory_bank_size {state['size']} (bank_hard_negatives="
                f"{state['keep_hard_negatives']}), this run asks for {self.size} ({self.keep_hard_negatives}): "
                "resume with the same memory_bank_size and bank_hard_negatives")
        self.num_hard_negatives = state["num_hard_negatives"]
        self.ptr, self.fill, self.num_enqueued = state["ptr"], state["fill"], state["num_enqueued"]
        for name in VECTORS + KEYS:
            setattr(self, name, state[name])

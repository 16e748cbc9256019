"""The dual memory bank: a pre-allocated FIFO ring buffer sized in samples.

Entry j holds a past query vector, the positive passage vector aligned with it, and
optionally that query's hard-negative vectors, plus an int64 key per passage (used to
mask false negatives). Everything is stored detached: the bank never holds a graph.
"""
from __future__ import annotations

import torch


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
        if batch_h < self.num_hard_negatives:
            raise ValueError(
                f"this bank keeps {self.num_hard_negatives} hard negatives per entry but the batch has {batch_h}; "
                "give every example the same number of hard negatives or set bank_hard_negatives=False"
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

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

import math

import torch

from .data import used_width

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
        self.tokens = {}  # side -> (token ids, attention mask) per slot, kept only for re-encoding (write_tokens)

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
    def enqueue(self, queries, passages, passage_keys, hard_negatives=None, hard_negative_keys=None) -> tuple[int, int]:
        """Write a batch (oldest first), overwriting the oldest entries. Returns (first slot, count): the slots
        written are first, first + 1, ... modulo the capacity."""
        n = queries.shape[0]
        if self.capacity == 0 or n == 0:
            return self.ptr, 0
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
        first = self.ptr
        # slots as a slice where the write does not wrap around (a copy, no index to make on the device)
        slots = slice(first, first + n) if first + n <= self.capacity else self.slots(first, n, self.queries.device)
        self.queries[slots] = queries.detach().to(self.queries.dtype)
        self.passages[slots] = passages.detach().to(self.passages.dtype)
        self.passage_keys[slots] = passage_keys.to(self.passage_keys.device)
        if self.num_hard_negatives:
            h = self.num_hard_negatives
            self.hard_negatives[slots] = hard_negatives[:, :h].detach().to(self.hard_negatives.dtype)
            self.hard_negative_keys[slots] = hard_negative_keys[:, :h].to(self.passage_keys.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.fill = min(self.fill + n, self.capacity)
        self.num_enqueued += n
        return first, n

    def slots(self, first: int, count: int, device) -> torch.Tensor:
        """Slots first, first + 1, ... (count of them, modulo the capacity) as an index made on `device`: an index
        made on the host would be copied there, a host sync on a GPU."""
        return (torch.arange(count, device=device) + first) % self.capacity

    @torch.no_grad()
    def write_tokens(self, first: int, features: dict) -> None:
        """Keep the token ids of the pairs about to be enqueued at slots first, first + 1, ... (modulo the
        capacity), so that they can be encoded again (ContAccumTrainingArguments.bank_refresh_steps). features:
        {side: {"input_ids": (n, width), "attention_mask": (n, width)}}, on the device: nothing is read back."""
        for side, f in features.items():
            ids, mask = f["input_ids"], f["attention_mask"].bool()
            kept_ids, kept_mask = self.tokens.get(side, (ids.new_zeros(self.capacity, 0, dtype=torch.int32),
                                                         mask.new_zeros(self.capacity, 0)))
            if ids.shape[1] > kept_ids.shape[1]:  # a longer batch than any before: widen, padding at the end
                grow = ids.shape[1] - kept_ids.shape[1]
                kept_ids, kept_mask = (torch.nn.functional.pad(t, (0, grow)) for t in (kept_ids, kept_mask))
            slots, grow = self.slots(first, ids.shape[0], ids.device), kept_ids.shape[1] - ids.shape[1]
            kept_ids[slots] = torch.nn.functional.pad(ids.to(torch.int32), (0, grow))  # whole rows: no old tokens left
            kept_mask[slots] = torch.nn.functional.pad(mask, (0, grow))
            self.tokens[side] = (kept_ids, kept_mask)

    def token_features(self, rows, side: str) -> dict:
        """The kept tokens of slots `rows` (a slice or an index) as model inputs, cut to their longest text (one
        read of the device)."""
        ids, mask = (t[rows] for t in self.tokens[side])
        width = used_width(mask) or 1
        return {"input_ids": ids[:, :width].long(), "attention_mask": mask[:, :width].long()}

    def newest(self, count: int) -> torch.Tensor:
        """Slots of the `count` most recent valid entries, oldest first."""
        count = min(count, self.fill)
        return torch.arange(self.ptr - count, self.ptr, device=self._device()) % max(self.capacity, 1)

    def _device(self):
        return self.queries.device if self.queries is not None else torch.device("cpu")

    def reset(self) -> None:
        self.ptr = self.fill = 0
        self.tokens = {}

    def to(self, device) -> MemoryBank:
        """Move the storage (e.g. a bank restored on the CPU, to the encoder's device)."""
        for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self.tokens = {side: tuple(t.to(device) for t in kept) for side, kept in self.tokens.items()}
        return self

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"capacity": self.capacity, "keep_hard_negatives": self.keep_hard_negatives,
                 "num_hard_negatives": self.num_hard_negatives,
                 "ptr": self.ptr, "fill": self.fill, "num_enqueued": self.num_enqueued}
        for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
            value = getattr(self, name)
            state[name] = None if value is None else value.detach().cpu().clone()
        for side, (ids, mask) in self.tokens.items():
            state[f"{side}_token_ids"], state[f"{side}_token_mask"] = ids.cpu().clone(), mask.cpu().clone()
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
        self.tokens = {side: (state[f"{side}_token_ids"].to(device or "cpu"), state[f"{side}_token_mask"].to(device or "cpu"))
                       for side in ("query", "passage") if f"{side}_token_ids" in state}


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

    Per row, one value per chunk of `chunk_size` slots. The FIFO writes slot after slot, so at any
    time one chunk is being overwritten (the "sweep" chunk): its value is the log-sum-exp of its
    new part (slots written since the sweep began, grown one enqueue at a time) and its old part
    (the slots not yet overwritten). The old part is read from suffix log-sum-exps over granules of
    `granule` slots, computed once from the old vectors when the sweep begins, plus a fresh
    computation of the less than one granule before the next granule boundary. So an enqueue costs
    ~(3 N_local + granule) x N_mem x d, plus N_mem x chunk x d once per chunk the pointer enters
    (~N_local x N_mem x d a micro-step on average, in one go), and no value is ever removed by
    subtracting exponentials: every value is a log-sum-exp of kept logits or of fresh ones. Every
    recomputation runs in blocks of rows, so its temporaries stay small at any bank size.
    """

    CACHE_SHARE = 0.05  # default sizes: chunk and suffix values together ~5 % of the bank vectors' floats
    MIN_FLOATS_PER_ROW = 16  # ... but at least this many per row (or d, if smaller), so the granule stays small
    BLOCK_FLOATS = 2**21  # logits per temporary block (8 MiB in fp32)

    def __init__(self, chunk_size: int | None = None):
        self.requested_chunk_size = chunk_size  # None: auto_sizes
        self.chunk_size = chunk_size
        self.granule = 1
        self.chunk_lse: torch.Tensor | None = None  # (capacity, num_chunks), fp32
        self.positive_logit: torch.Tensor | None = None  # (capacity,), fp32: q_j . p_j / temperature
        self.sweep_chunk: int | None = None  # the chunk being overwritten, None between chunks
        self.new_lse: torch.Tensor | None = None  # (capacity,): over the sweep chunk's slots written so far
        self.old_suffix: torch.Tensor | None = None  # (capacity, granules per chunk): old slots from granule j on
        self._completing = (None, None)  # between before_write and update: the chunk left, and its new part
        self.stale = True

    def _slot_lse(self, bank, rows, first, last, temperature, mask_false_negatives):
        """(R, last-first): per row, log-sum-exp over the 1+H columns of each slot in [first, last)."""
        vecs, keys = bank_columns(bank, first, last)
        num_slots, width = keys.shape
        queries = bank.queries[rows]
        logits = (queries @ vecs.flatten(0, 1).T).view(-1, num_slots, width) / temperature
        # The masks are built from what the host knows (the slot range, the fill, a slice of rows), so that a
        # micro-step launches few ops: it is launch-bound on a GPU (benchmarks/launch_count.py)
        drop = None
        if last > bank.fill:  # slots not written yet (only while the bank fills)
            drop = (torch.arange(first, last, device=keys.device) >= bank.fill)[None, :, None]
        if mask_false_negatives:  # a column with the row's positive key, other than that positive itself
            same = keys[None] == bank.passage_keys[rows][:, None, None]
            if isinstance(rows, slice):  # contiguous rows (_blocks' slices): those in [first, last) are a diagonal
                start, stop, step = rows.indices(bank.capacity)
                assert step == 1, "the cache reads rows in contiguous blocks"
                lo, hi = max(start, first), min(stop, last)
                if lo < hi:
                    same[lo - start:hi - start, lo - first:hi - first, 0].diagonal().fill_(False)
            else:  # an index of slots (rows written across the wrap-around)
                same[..., 0] &= rows[:, None] != torch.arange(first, last, device=keys.device)[None]
            drop = same if drop is None else drop | same
        if drop is not None:
            logits = logits.masked_fill(drop, NEG_INF)
        return logits[..., 0] if width == 1 else logits.logsumexp(-1)

    def _span_lse(self, bank, rows, first, last, temperature, mask):
        """(R,): log-sum-exp over every column of the slots [first, last) (-inf when empty)."""
        if last <= first:
            return torch.full_like(self.positive_logit[rows], NEG_INF)
        return self._slot_lse(bank, rows, first, last, temperature, mask).logsumexp(-1)

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

    def _chunk_span(self, chunk: int, capacity: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(chunk * self.chunk_size + self.chunk_size, capacity)

    def _set_sweep_rows(self, bank, rows, begin, temperature, mask):
        """For `rows`: the sweep chunk's new part [chunk start, begin) and the suffixes of the rest, from the
        vectors now in the bank (suffixes of granules before `begin` are never read)."""
        first, last = self._chunk_span(self.sweep_chunk, bank.capacity)
        width = 1 + bank.num_hard_negatives
        for block in self._blocks(rows, (last - first) * width):
            slot_lse = self._slot_lse(bank, block, first, last, temperature, mask)
            self.new_lse[block] = slot_lse[:, :begin - first].logsumexp(-1) if begin > first else NEG_INF
            granules = self._grouped_lse(slot_lse, self.granule)  # fewer than granules per chunk in a short last chunk
            self.old_suffix[block, :granules.shape[1]] = granules.flip(-1).logcumsumexp(-1).flip(-1)
            self.old_suffix[block, granules.shape[1]:] = NEG_INF

    def _old_part(self, bank, rows, ptr, temperature, mask):
        """(R,): log-sum-exp over the sweep chunk's slots [ptr, chunk end), not yet overwritten: fresh up to
        the next granule boundary, from the suffixes after it."""
        first, last = self._chunk_span(self.sweep_chunk, bank.capacity)
        j = -(-(ptr - first) // self.granule)
        boundary = min(first + j * self.granule, last)
        fresh = self._span_lse(bank, rows, ptr, boundary, temperature, mask)
        if j >= self.old_suffix.shape[1]:
            return fresh
        return torch.logaddexp(fresh, self.old_suffix[rows, j])

    def _refresh_rows(self, bank, rows, temperature, mask):
        """Everything of the given (just written, or all) rows, from the bank as it is now."""
        width = 1 + bank.num_hard_negatives
        for block in self._blocks(rows, bank.capacity * width):
            self.chunk_lse[block] = self._grouped_lse(
                self._slot_lse(bank, block, 0, bank.capacity, temperature, mask), self.chunk_size)
            self.positive_logit[block] = (bank.queries[block] * bank.passages[block]).sum(-1) / temperature
        if self.sweep_chunk is not None:
            self._set_sweep_rows(bank, rows, bank.ptr, temperature, mask)

    @torch.no_grad()
    def before_write(self, bank: MemoryBank, count: int, temperature: float, mask: bool) -> None:
        """Call before `bank.enqueue` of `count` rows: if the write ends inside a chunk that is not yet being
        swept, begin its sweep while its old vectors are still in the bank."""
        if self.stale or bank.queries is None or count == 0:
            return
        count = min(count, bank.capacity)
        end = (bank.ptr + count) % bank.capacity
        chunk = end // self.chunk_size
        if end % self.chunk_size == 0 or chunk == self.sweep_chunk:
            return  # the write ends on a chunk boundary, or continues the sweep
        first, _ = self._chunk_span(chunk, bank.capacity)
        begin = bank.ptr if first <= bank.ptr < end else first  # the write starts inside this chunk or before it
        if self.sweep_chunk is not None:  # this write completes the chunk swept so far: keep its new part
            self._completing = (self.sweep_chunk, self.new_lse.clone())
        self.sweep_chunk = chunk
        self._set_sweep_rows(bank, slice(0, bank.fill), begin, temperature, mask)

    @torch.no_grad()
    def update(self, bank: MemoryBank, written: tuple[int, int], temperature: float, mask: bool) -> None:
        """Call after `bank.enqueue` with what it returned, (first slot, count) (and before_write before it).
        The slot arithmetic is on host integers and every index is made on the device: no host sync."""
        device = bank.queries.device
        if self.stale:  # first use, reset or resume: rebuild from the bank itself
            capacity, dim = bank.capacity, bank.queries.shape[1]
            if self.requested_chunk_size:
                self.chunk_size = self.requested_chunk_size
                self.granule = max(1, self.chunk_size ** 2 // capacity)  # suffix and chunk values balanced
            else:
                self.chunk_size, self.granule = self.auto_sizes(capacity, dim)
            self.chunk_lse = torch.full((capacity, -(-capacity // self.chunk_size)), NEG_INF, device=device)
            self.positive_logit = torch.zeros(capacity, device=device)
            self.new_lse = torch.full((capacity,), NEG_INF, device=device)
            self.old_suffix = torch.full((capacity, -(-self.chunk_size // self.granule)), NEG_INF, device=device)
            self.sweep_chunk, self._completing = None, (None, None)
            self._refresh_rows(bank, slice(0, bank.fill), temperature, mask)
            self.stale = False
            return
        start, count = written
        if count == 0:
            return
        completing, self._completing = self._completing, (None, None)
        valid = slice(0, bank.fill)
        width = 1 + bank.num_hard_negatives
        capacity = bank.capacity
        ranges = [(start, min(start + count, capacity))] + ([(0, start + count - capacity)]
                                                           if start + count > capacity else [])  # wrapped around
        pieces = {}  # chunk -> the [lo, hi) ranges written in it
        for a, b in ranges:
            for chunk in range(a // self.chunk_size, (b - 1) // self.chunk_size + 1):
                first, last = self._chunk_span(chunk, capacity)
                pieces.setdefault(chunk, []).append((max(a, first), min(b, last)))
        for chunk in sorted(pieces):
            first, last = self._chunk_span(chunk, capacity)
            lo, hi = min(a for a, _ in pieces[chunk]), max(b for _, b in pieces[chunk])
            contiguous = hi - lo == sum(b - a for a, b in pieces[chunk])
            # the sweep grows only by one range that ends at the pointer; anything else (a chunk written to its
            # end and left, or a write that wrapped around into it) is recomputed whole, which is always exact
            if chunk == self.sweep_chunk and contiguous and hi % bank.capacity == bank.ptr:
                # out= writes into the cache in place, with no copy after: `valid` is a slice, so its blocks are
                # slices and these indexed tensors are views
                for block in self._blocks(valid, max(hi - lo, self.granule) * width):
                    torch.logaddexp(self.new_lse[block], self._span_lse(bank, block, lo, hi, temperature, mask),
                                    out=self.new_lse[block])
                    old = self._old_part(bank, block, hi, temperature, mask)
                    torch.logaddexp(self.new_lse[block], old, out=self.chunk_lse[block, chunk])
            elif chunk == completing[0] and contiguous and hi == last:  # written to its end
                for block in self._blocks(valid, (hi - lo) * width):
                    torch.logaddexp(completing[1][block], self._span_lse(bank, block, lo, hi, temperature, mask),
                                    out=self.chunk_lse[block, chunk])
            else:
                if chunk == self.sweep_chunk:
                    self.sweep_chunk = None
                for block in self._blocks(valid, (last - first) * width):
                    self.chunk_lse[block, chunk] = self._span_lse(bank, block, first, last, temperature, mask)
        if bank.ptr % self.chunk_size == 0:
            self.sweep_chunk = None  # the pointer is on a chunk boundary: the next write begins a new sweep
        rows = slice(*ranges[0]) if len(ranges) == 1 else bank.slots(start, count, device)
        self._refresh_rows(bank, rows, temperature, mask)  # last: the written rows, all fresh

    @classmethod
    def auto_sizes(cls, capacity: int, dim: int) -> tuple[int, int]:
        """(chunk, granule): per row, capacity / chunk chunk values plus chunk / granule suffix values,
        ~CACHE_SHARE of the 2d floats of the row's own query and passage vectors (at least
        min(MIN_FLOATS_PER_ROW, d)), with the smallest granule that fits: chunk = sqrt(capacity x granule) puts
        half the budget in each. At N_mem 65,536 and d 768: chunks of 1,737 slots, granules of 46."""
        budget = max(int(2 * dim * cls.CACHE_SHARE), min(cls.MIN_FLOATS_PER_ROW, dim))  # tiny d: <= d floats
        granule = max(1, -(-4 * capacity // budget ** 2))
        while True:
            chunk = min(capacity, max(1, math.ceil(math.sqrt(capacity * granule))))
            if -(-capacity // chunk) + -(-chunk // granule) <= budget or granule >= capacity:
                return chunk, granule
            granule += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.chunk_lse, self.positive_logit, self.new_lse,
                                                           self.old_suffix) if t is not None)

    def row_lse(self, rows) -> torch.Tensor:
        return self.chunk_lse[rows].logsumexp(-1)

    def row_positive_logit(self, rows) -> torch.Tensor:
        return self.positive_logit[rows]

    _TENSORS = ("chunk_lse", "positive_logit", "new_lse", "old_suffix")

    def to(self, device) -> BankLogsumexp:
        for name in self._TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    # The cache is derived from the bank, but a rebuild sums in another order than the incremental
    # updates did: checkpointing it makes a resumed run bitwise equal to an uninterrupted one.
    def state_dict(self) -> dict | None:
        if self.stale:
            return None
        return {"chunk_size": self.chunk_size, "granule": self.granule, "sweep_chunk": self.sweep_chunk,
                **{name: getattr(self, name).cpu() for name in self._TENSORS}}

    def load_state_dict(self, state: dict | None) -> None:
        # a checkpoint from an earlier cache layout: rebuild the cache from the bank
        self.stale = state is None or "old_suffix" not in state or self.requested_chunk_size not in (
            None, state["chunk_size"])
        if not self.stale:
            self.chunk_size, self.granule, self.sweep_chunk = state["chunk_size"], state["granule"], state["sweep_chunk"]
            for name in self._TENSORS:
                setattr(self, name, state[name])

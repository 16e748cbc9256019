"""BankLogsumexp: what a banked query row needs of the constant bank x bank block, kept up to date.

A banked row's loss needs the log-sum-exp of its logits over every banked column and its own
positive's logit; both stay constant until the row or a column is overwritten. Recomputing them
costs 2 N_mem^2 d per micro-batch; keeping them costs ~4 N_local N_mem d (docs/how-it-works.md#the-log-sum-exp-cache).
"""
from __future__ import annotations

import math

import torch

from .bank import MemoryBank

NEG_INF = float("-inf")


class BankLogsumexp:
    """Per banked row: one log-sum-exp per chunk of `chunk_size` slots, and the positive's logit.

    The FIFO writes slot after slot, so one chunk at a time is being overwritten (the "sweep" chunk): its value
    is the log-sum-exp of its new part (slots written since the sweep began, grown one enqueue at a time) and
    its old part (the slots not yet overwritten), read from suffix log-sum-exps over granules of `granule`
    slots, computed once from the old vectors when the sweep begins, plus a fresh computation of the less
    than one granule before the next granule boundary. No value is ever removed by subtracting exponentials:
    every value is a log-sum-exp of kept logits or of fresh ones. Recomputations run in blocks of rows, so
    their temporaries stay small at any bank size.

    temperature and mask_false_negatives are fixed at construction; the bank holds vectors the similarity
    compares (unit vectors for cosine), so a logit is a dot product over the temperature."""

    CACHE_SHARE = 0.05  # chunk and suffix values together ~5 % of the bank vectors' floats
    MIN_FLOATS_PER_ROW = 16  # ... but at least this many per row (or d, if smaller), so the granule stays small
    BLOCK_FLOATS = 2**21  # logits per temporary block (8 MiB in fp32)
    _TENSORS = ("chunk_lse", "positive_logit", "new_lse", "old_suffix")
    chunk_size_override: int | None = None  # tests: every cache built uses chunks this small (edge cases)

    def __init__(self, temperature: float, mask_false_negatives: bool, chunk_size: int | None = None):
        self.temperature, self.mask = float(temperature), bool(mask_false_negatives)
        self.requested_chunk_size = chunk_size or self.chunk_size_override  # None: auto_sizes
        self.chunk_size, self.granule = chunk_size, 1
        self.chunk_lse = self.positive_logit = self.new_lse = self.old_suffix = None
        self.sweep_chunk: int | None = None  # the chunk being overwritten, None between chunks
        self._completing = (None, None)  # between before_write and update: the chunk left, and its new part
        self.stale = True  # rebuilt from the bank at the next update (first use, reset, resume, moved vectors)

    def _slot_lse(self, bank: MemoryBank, rows, first: int, last: int):
        """(R, last-first): per row, log-sum-exp over the 1+H columns of each slot in [first, last)."""
        vecs, keys = bank.columns(first, last)
        num_slots, width = keys.shape
        logits = (bank.queries[rows] @ vecs.flatten(0, 1).T).view(-1, num_slots, width) / self.temperature
        # masks from what the host knows (the slot range, the fill, a slice of rows): few ops per micro-step
        drop = None
        if last > bank.fill:  # slots not written yet (only while the bank fills)
            drop = (torch.arange(first, last, device=keys.device) >= bank.fill)[None, :, None]
        if self.mask:  # a column with the row's positive key, other than that positive itself
            same = keys[None] == bank.passage_keys[rows][:, None, None]
            if isinstance(rows, slice):  # contiguous rows: those in [first, last) are a diagonal
                start, stop, _ = rows.indices(bank.size)
                lo, hi = max(start, first), min(stop, last)
                if lo < hi:
                    same[lo - start:hi - start, lo - first:hi - first, 0].diagonal().fill_(False)
            else:  # an index of slots (rows written across the wrap-around)
                same[..., 0] &= rows[:, None] != torch.arange(first, last, device=keys.device)[None]
            drop = same if drop is None else drop | same
        if drop is not None:
            logits = logits.masked_fill(drop, NEG_INF)
        return logits[..., 0] if width == 1 else logits.logsumexp(-1)

    def _span_lse(self, bank, rows, first, last):
        """(R,): log-sum-exp over every column of the slots [first, last) (-inf when empty)."""
        if last <= first:
            return torch.full_like(self.positive_logit[rows], NEG_INF)
        return self._slot_lse(bank, rows, first, last).logsumexp(-1)

    def _blocks(self, rows, num_columns: int) -> list:
        """`rows` (a slice or an index tensor) in blocks whose logits against num_columns fit BLOCK_FLOATS."""
        step = max(1, self.BLOCK_FLOATS // max(num_columns, 1))
        if isinstance(rows, slice):
            return [slice(s, min(s + step, rows.stop)) for s in range(rows.start, rows.stop, step)]
        return [rows[s:s + step] for s in range(0, len(rows), step)]

    @staticmethod
    def _grouped_lse(values, group):
        """Log-sum-exp over consecutive groups of `group` columns (last group padded)."""
        pad = -values.shape[1] % group
        if pad:
            values = torch.cat([values, values.new_full((values.shape[0], pad), NEG_INF)], 1)
        return values.view(values.shape[0], -1, group).logsumexp(-1)

    def _span(self, chunk: int, size: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(chunk * self.chunk_size + self.chunk_size, size)

    def _set_sweep_rows(self, bank, rows, begin):
        """For `rows`: the sweep chunk's new part [chunk start, begin) and the suffixes of the rest, from the
        vectors now in the bank (suffixes of granules before `begin` are never read)."""
        first, last = self._span(self.sweep_chunk, bank.size)
        for block in self._blocks(rows, (last - first) * (1 + bank.num_hard_negatives)):
            slot_lse = self._slot_lse(bank, block, first, last)
            self.new_lse[block] = slot_lse[:, :begin - first].logsumexp(-1) if begin > first else NEG_INF
            granules = self._grouped_lse(slot_lse, self.granule)  # fewer in a short last chunk
            self.old_suffix[block, :granules.shape[1]] = granules.flip(-1).logcumsumexp(-1).flip(-1)
            self.old_suffix[block, granules.shape[1]:] = NEG_INF

    def _old_part(self, bank, rows, ptr):
        """(R,): log-sum-exp over the sweep chunk's slots [ptr, chunk end), not yet overwritten: fresh up to
        the next granule boundary, from the suffixes after it."""
        first, last = self._span(self.sweep_chunk, bank.size)
        j = -(-(ptr - first) // self.granule)
        fresh = self._span_lse(bank, rows, ptr, min(first + j * self.granule, last))
        return fresh if j >= self.old_suffix.shape[1] else torch.logaddexp(fresh, self.old_suffix[rows, j])

    def _refresh_rows(self, bank, rows):
        """Everything of the given (just written, or all) rows, from the bank as it is now."""
        for block in self._blocks(rows, bank.size * (1 + bank.num_hard_negatives)):
            self.chunk_lse[block] = self._grouped_lse(self._slot_lse(bank, block, 0, bank.size), self.chunk_size)
            self.positive_logit[block] = (bank.queries[block] * bank.passages[block]).sum(-1) / self.temperature
        if self.sweep_chunk is not None:
            self._set_sweep_rows(bank, rows, bank.ptr)

    def _rebuild(self, bank):
        size, device = bank.size, bank.queries.device
        if self.requested_chunk_size:
            self.chunk_size = self.requested_chunk_size
            self.granule = max(1, self.chunk_size ** 2 // size)  # suffix and chunk values balanced
        else:
            self.chunk_size, self.granule = self.auto_sizes(size, bank.queries.shape[1])
        self.chunk_lse = torch.full((size, -(-size // self.chunk_size)), NEG_INF, device=device)
        self.positive_logit = torch.zeros(size, device=device)
        self.new_lse = torch.full((size,), NEG_INF, device=device)
        self.old_suffix = torch.full((size, -(-self.chunk_size // self.granule)), NEG_INF, device=device)
        self.sweep_chunk, self._completing = None, (None, None)
        self._refresh_rows(bank, slice(0, bank.fill))
        self.stale = False

    @torch.no_grad()
    def before_write(self, bank: MemoryBank, count: int) -> None:
        """Call before `bank.enqueue` of `count` rows: if the write ends inside a chunk that is not yet being
        swept, begin its sweep while its old vectors are still in the bank."""
        if self.stale or bank.queries is None or count == 0:
            return
        end = (bank.ptr + min(count, bank.size)) % bank.size
        chunk = end // self.chunk_size
        if end % self.chunk_size == 0 or chunk == self.sweep_chunk:
            return  # the write ends on a chunk boundary, or continues the sweep
        first, _ = self._span(chunk, bank.size)
        begin = bank.ptr if first <= bank.ptr < end else first  # the write starts inside this chunk or before it
        if self.sweep_chunk is not None:  # this write completes the chunk swept so far: keep its new part
            self._completing = (self.sweep_chunk, self.new_lse.clone())
        self.sweep_chunk = chunk
        self._set_sweep_rows(bank, slice(0, bank.fill), begin)

    @torch.no_grad()
    def update(self, bank: MemoryBank, written: tuple[int, int]) -> None:
        """Call after `bank.enqueue` with what it returned, (first slot, count). The slot arithmetic is on host
        integers and every index is made on the device: no host sync."""
        if self.stale:
            self._rebuild(bank)
            return
        start, count = written
        if count == 0:
            return
        completing, self._completing = self._completing, (None, None)
        valid, width, size = slice(0, bank.fill), 1 + bank.num_hard_negatives, bank.size
        ranges = [(start, min(start + count, size))] + ([(0, start + count - size)] if start + count > size else [])
        pieces = {}  # chunk -> the [lo, hi) ranges written in it
        for a, b in ranges:
            for chunk in range(a // self.chunk_size, (b - 1) // self.chunk_size + 1):
                first, last = self._span(chunk, size)
                pieces.setdefault(chunk, []).append((max(a, first), min(b, last)))
        for chunk in sorted(pieces):
            first, last = self._span(chunk, size)
            lo, hi = min(a for a, _ in pieces[chunk]), max(b for _, b in pieces[chunk])
            contiguous = hi - lo == sum(b - a for a, b in pieces[chunk])
            # the sweep grows only by one range that ends at the pointer; anything else (a chunk written to its
            # end and left, or a write that wrapped around into it) is recomputed whole, which is always exact
            if chunk == self.sweep_chunk and contiguous and hi % size == bank.ptr:
                # out= writes into the cache in place: `valid` is a slice, so its blocks index views
                for block in self._blocks(valid, max(hi - lo, self.granule) * width):
                    torch.logaddexp(self.new_lse[block], self._span_lse(bank, block, lo, hi), out=self.new_lse[block])
                    torch.logaddexp(self.new_lse[block], self._old_part(bank, block, hi),
                                    out=self.chunk_lse[block, chunk])
            elif chunk == completing[0] and contiguous and hi == last:  # written to its end
                for block in self._blocks(valid, (hi - lo) * width):
                    torch.logaddexp(completing[1][block], self._span_lse(bank, block, lo, hi),
                                    out=self.chunk_lse[block, chunk])
            else:
                if chunk == self.sweep_chunk:
                    self.sweep_chunk = None
                for block in self._blocks(valid, (last - first) * width):
                    self.chunk_lse[block, chunk] = self._span_lse(bank, block, first, last)
        if bank.ptr % self.chunk_size == 0:
            self.sweep_chunk = None  # the pointer is on a chunk boundary: the next write begins a new sweep
        rows = slice(*ranges[0]) if len(ranges) == 1 else bank.slots(start, count, bank.queries.device)
        self._refresh_rows(bank, rows)  # last: the written rows, all fresh

    @classmethod
    def auto_sizes(cls, size: int, dim: int) -> tuple[int, int]:
        """(chunk, granule): per row, size / chunk chunk values plus chunk / granule suffix values, ~CACHE_SHARE
        of the 2d floats of the row's own query and passage vectors (at least min(MIN_FLOATS_PER_ROW, d)), with
        the smallest granule that fits: chunk = sqrt(size x granule) puts half the budget in each."""
        budget = max(int(2 * dim * cls.CACHE_SHARE), min(cls.MIN_FLOATS_PER_ROW, dim))
        granule = max(1, -(-4 * size // budget ** 2))
        while True:
            chunk = min(size, max(1, math.ceil(math.sqrt(size * granule))))
            if -(-size // chunk) + -(-chunk // granule) <= budget or granule >= size:
                return chunk, granule
            granule += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for name in self._TENSORS if (t := getattr(self, name)) is not None)

    def row_lse(self, bank: MemoryBank, rows) -> torch.Tensor:
        """Log-sum-exp of each row's logits over every banked column (rebuilt first if stale)."""
        if self.stale:
            self._rebuild(bank)
        return self.chunk_lse[rows].logsumexp(-1)

    def row_positive_logit(self, rows) -> torch.Tensor:
        return self.positive_logit[rows]

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
        self.stale = state is None or self.requested_chunk_size not in (None, state["chunk_size"])
        if not self.stale:
            self.chunk_size, self.granule, self.sweep_chunk = state["chunk_size"], state["granule"], state["sweep_chunk"]
            for name in self._TENSORS:
                setattr(self, name, state[name])

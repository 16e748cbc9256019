"""MemoryBank: FIFO order, wrap-around, oversized batches, no graphs, checkpoint state."""
import functools
import os

import psutil
import pytest
import torch

from hf_contaccum.core.bank import MemoryBank
from hf_contaccum.core.loss import ContAccumLoss


def _push(bank, start, n, d=4, h=0):
    ids = torch.arange(start, start + n)
    vec = ids[:, None].float().expand(n, d).clone()
    hn = vec[:, None].expand(n, h, d).clone() + 0.5 if h else None
    return bank.enqueue(vec, -vec, ids, hn, ids[:, None].expand(n, h).clone() if h else None)


def _fifo_contents(bank):
    """Entry ids oldest first."""
    return bank.passage_keys[bank.newest(bank.fill)].tolist()


def test_fifo_order_and_wraparound():
    bank = MemoryBank(5)
    _push(bank, 0, 3)
    assert _fifo_contents(bank) == [0, 1, 2] and bank.fill == 3
    _push(bank, 3, 3)  # wraps: 0 is dropped
    assert _fifo_contents(bank) == [1, 2, 3, 4, 5] and bank.fill == 5 and bank.ptr == 1
    _push(bank, 6, 2)
    assert _fifo_contents(bank) == [3, 4, 5, 6, 7]
    assert torch.equal(bank.queries[bank.newest(5)][:, 0], torch.tensor([3.0, 4, 5, 6, 7]))
    assert torch.equal(bank.passages[bank.newest(5)][:, 0], -torch.tensor([3.0, 4, 5, 6, 7]))
    assert bank.num_enqueued == 8


def test_batch_larger_than_bank_keeps_newest():
    bank = MemoryBank(4)
    _push(bank, 0, 2)
    _push(bank, 2, 9)
    assert _fifo_contents(bank) == [7, 8, 9, 10]
    assert bank.num_enqueued == 11 and bank.queries.shape == (4, 4)


def test_hard_negatives_stay_aligned():
    bank = MemoryBank(3, keep_hard_negatives=True)
    for start in range(0, 10, 2):
        _push(bank, start, 2, h=2)
    rows = bank.newest(3)
    assert torch.equal(bank.hard_negatives[rows][:, :, 0], bank.queries[rows][:, None, 0].expand(3, 2) + 0.5)
    with pytest.raises(ValueError, match="hard negatives"):
        _push(bank, 20, 2, h=0)


def test_bank_holds_no_graph():
    bank = MemoryBank(8)
    x = torch.randn(3, 4, requires_grad=True)
    y = x * 2
    bank.enqueue(y, y + 1, torch.arange(3))
    assert bank.queries.grad_fn is None and not bank.queries.requires_grad
    assert bank.passages.grad_fn is None and not bank.passages.requires_grad


def test_state_dict_round_trip():
    bank = MemoryBank(5, keep_hard_negatives=True)
    for start in range(0, 12, 3):
        _push(bank, start, 3, h=1)
    restored = MemoryBank(5, keep_hard_negatives=True)
    restored.load_state_dict(bank.state_dict())
    for name in ("queries", "passages", "hard_negatives", "passage_keys", "hard_negative_keys"):
        assert torch.equal(getattr(bank, name), getattr(restored, name))
    assert (restored.ptr, restored.fill, restored.num_enqueued) == (bank.ptr, bank.fill, bank.num_enqueued)
    with pytest.raises(ValueError, match="memory_bank_size"):
        MemoryBank(6, keep_hard_negatives=True).load_state_dict(bank.state_dict())


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        MemoryBank(-3)


def _rss_mb():
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2, bound once (the peak test calls it after every op), or None off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    return libc.mallinfo2


def _live_heap_mib():
    """Bytes the C heap holds for live allocations (glibc's mallinfo2), or None off glibc. Unlike RSS it
    does not move with fragmentation, so a few MiB of growth is a real leak."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


@pytest.mark.slow
def test_bounded_memory_over_2000_micro_steps():
    """The failure that sank sentence-transformers PR #3612: a cache that grows every step."""
    torch.manual_seed(0)
    d, n = 128, 8  # the bank's size in samples is what matters here, not d
    encoder = torch.nn.Linear(d, d)
    loss_fn = ContAccumLoss(4096, temperature=0.05, similarity="cos")
    rss, live = [], []
    for step in range(2000):
        x = torch.randn(2 * n, d)
        out = encoder(x)
        q, p = out[:n], out[n:]
        keys = torch.arange(step * n, step * n + n)
        loss_fn(q, p, keys).backward()  # the backward enqueues the micro-batch
        if step >= 600 and step % 100 == 0:  # bank full after 512 micro-steps
            rss.append(_rss_mb())
            live.append(_live_heap_mib())
    assert loss_fn.bank.fill == 4096 and loss_fn.bank.queries.shape == (4096, d)
    assert loss_fn.bank.num_enqueued == 2000 * n
    if live[0] is not None:  # live allocations: flat to 0.4 MiB here; a 4 KiB-per-step leak adds 5 MiB
        assert max(live) <= live[0] + 2, live
    else:  # RSS also moves with the allocator's fragmentation (+-40 MiB seen): only a gross leak shows
        assert max(rss) <= rss[0] * 1.1, rss


@pytest.mark.parametrize("capacity, dim", [(4096, 384), (16384, 8), (1000, 4)])
def test_log_sum_exp_cache_never_exceeds_the_bank_vectors(capacity, dim):
    """The default chunk grows with N_mem: the cache stays below the bank's own 2 x N_mem x d floats
    (with fixed chunks of 16 it grows as N_mem^2 / 16: 67 MB against 1 MB of vectors at 16384 x 8)."""
    loss_fn = ContAccumLoss(capacity)
    vectors = torch.nn.functional.normalize(torch.randn(capacity, dim), dim=-1)
    loss_fn.enqueue(vectors, vectors, torch.arange(capacity))
    loss_fn.cache.update(loss_fn.bank, (loss_fn.bank.ptr, 0))
    vector_bytes = 2 * capacity * dim * 4
    assert 0 < loss_fn.cache.nbytes() <= vector_bytes
    if dim >= 96:  # ~d/10 floats per row: within 10 % of the vectors (small d: min(16, d) + 2 floats per row)
        assert loss_fn.cache.nbytes() <= 0.1 * vector_bytes


def test_the_bank_adds_little_beyond_its_vectors_while_the_encoder_holds_its_activations():
    """Peak memory of ContAccum over GradAccum should be the bank's own vectors: the loss's forward must
    not make N_mem x d temporaries, and the enqueue (whose cache refresh does make block-sized ones) runs
    only when the whole backward has ended, after the encoder's activations are freed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if _live_heap_mib() is None:
        pytest.skip("needs glibc's mallinfo2 to see the heap")

    class PeakHeap(TorchDispatchMode):
        peak = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _live_heap_mib())
            return out

    torch.manual_seed(0)
    m, d, n = 8192, 768, 8  # bert-base's d
    loss_fn = ContAccumLoss(m, temperature=0.05)
    vectors = torch.nn.functional.normalize(torch.randn(m, d), dim=-1)
    loss_fn.enqueue(vectors, vectors, torch.arange(m) - 10**9)
    encoder = torch.nn.Linear(d, d)

    def micro_step(step):
        x = torch.randn(3 * n, d, requires_grad=True)
        seen = {}

        def record(grad):  # x's gradient is the last one the backward computes
            seen["enqueued_when_the_encoder_backward_ran"] = loss_fn.bank.num_enqueued

        x.register_hook(record)
        out = encoder(x)
        keys = torch.arange(n) + step * n
        return x, seen, loss_fn(out[:n], out[n:2 * n], keys, out[2 * n:, None], keys[:, None] + 10**6)

    micro_step(0)[2].backward()
    before = _live_heap_mib()
    with PeakHeap() as heap:
        _x, seen, loss = micro_step(1)  # _x: the leaf whose hook reports, kept alive
    vector_mib = 2 * m * d * 4 / 2**20
    assert heap.peak - before <= 0.1 * vector_mib, (heap.peak - before, vector_mib)
    enqueued = loss_fn.bank.num_enqueued
    loss.backward()
    assert seen["enqueued_when_the_encoder_backward_ran"] == enqueued  # the bank was not touched yet
    assert loss_fn.bank.num_enqueued == enqueued + n  # and was once the backward ended


def test_automatic_sizes_match_the_equations():
    """Default sizes with a granule > 1, a chunk that does not divide N_mem and micro-batches that do not
    divide the granule: the sweep's pointer lands mid-granule, and the bank wraps around."""
    from helpers.references import naive_contaccum_loss

    torch.manual_seed(3)
    d, n, m = 20, 3, 100
    loss_fn = ContAccumLoss(m, 0.5, mask_false_negatives=False)
    for _ in range(45):  # fills and wraps around
        q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        f = loss_fn.bank.fill
        bq = loss_fn.bank.queries[:f].clone() if f else torch.zeros(0, d)
        bp = loss_fn.bank.passages[:f].clone() if f else torch.zeros(0, d)
        loss = loss_fn(q, p, torch.arange(n))
        assert torch.allclose(loss, naive_contaccum_loss(q, p, None, bq, bp, None, 0.5), atol=1e-5)
        loss.backward()
    # 16 floats per row: 100 / 15 -> 7 chunk values + 15 / 2 -> 8 suffix values
    assert (loss_fn.cache.chunk_size, loss_fn.cache.granule) == (15, 2)


def _brute_force_row_lse(loss_fn):
    bank, f = loss_fn.bank, loss_fn.bank.fill
    vecs, keys = bank.columns()
    logits = bank.queries[:f] @ vecs.flatten(0, 1).T / loss_fn.temperature
    own = torch.zeros(f, keys.numel(), dtype=torch.bool)
    own[torch.arange(f), torch.arange(f) * keys.shape[1]] = True
    same = keys.flatten()[None] == bank.passage_keys[:f, None]
    return logits.masked_fill(same & ~own, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("capacity", [10, 40, 97])
@pytest.mark.parametrize("chunk", [None, 1, 4, 10, "capacity"])
@pytest.mark.parametrize("hard_negatives", [0, 2])
def test_the_cache_equals_a_brute_force_log_sum_exp_after_every_enqueue(capacity, chunk, hard_negatives):
    """Every way a FIFO write can meet the chunks: within the swept chunk, to its end, across several
    chunks, around the end of the bank back into the same chunk, a whole bank at once, more than a bank;
    a rebuild mid-chunk (as after a reset or an old checkpoint); masked duplicate keys; banked hard
    negatives. The cache must equal the log-sum-exp of the whole bank block, recomputed from scratch."""
    torch.manual_seed(capacity)
    chunk = capacity if chunk == "capacity" else chunk
    loss_fn = ContAccumLoss(capacity, 0.5, bank_hard_negatives=bool(hard_negatives))
    loss_fn.cache.requested_chunk_size = chunk
    sizes = [3, 4, 4, 5, 1, 2, 7, capacity, capacity + 3, 8]
    for step in range(4 * len(sizes)):
        n, d, h = sizes[step % len(sizes)], 6, hard_negatives
        loss_fn.enqueue(torch.randn(n, d), torch.randn(n, d), torch.randint(0, 3 * capacity, (n,)),
                        torch.randn(n, h, d) if h else None, torch.randint(0, 3 * capacity, (n, h)) if h else None)
        if step == 2:
            loss_fn.cache.stale = True
            loss_fn.cache.update(loss_fn.bank, (loss_fn.bank.ptr, 0))
        got = loss_fn.cache.row_lse(loss_fn.bank, slice(0, loss_fn.bank.fill))
        torch.testing.assert_close(got, _brute_force_row_lse(loss_fn), atol=1e-4, rtol=1e-5)


def test_an_enqueue_costs_order_n_local_x_n_mem_logits(monkeypatch):
    """The refresh computes ~(4 N_local + granule) x N_mem logits per enqueue, on average over a sweep: at
    N_mem 4096 and d 384, 35 per row for 8 new pairs (a chunked cache without the sweep recomputes the whole
    touched chunk: with chunks sized for the same memory, 108 + 8 per row)."""
    from hf_contaccum.core.lse_cache import BankLogsumexp

    counted = []
    slot_lse = BankLogsumexp._slot_lse

    def counting(self, bank, rows, first, last, *args):
        out = slot_lse(self, bank, rows, first, last, *args)
        counted.append(out.numel())
        return out

    m, d, n = 4096, 384, 8
    loss_fn = ContAccumLoss(m, temperature=0.05)
    vectors = torch.nn.functional.normalize(torch.randn(m, d), dim=-1)
    loss_fn.enqueue(vectors, vectors, torch.arange(m))
    monkeypatch.setattr(BankLogsumexp, "_slot_lse", counting)
    enqueues = 4 * loss_fn.cache.chunk_size // n  # several sweeps
    for step in range(enqueues):
        q = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
        loss_fn.enqueue(q, q, torch.arange(n) + m + step * n)
    per_row = sum(counted) / enqueues / m
    assert per_row <= 5 * n + loss_fn.cache.granule, (per_row, loss_fn.cache.chunk_size)

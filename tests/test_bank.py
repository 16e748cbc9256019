"""MemoryBank: FIFO order, wrap-around, oversized batches, no graphs, checkpoint state."""
import os

import psutil
import pytest
import torch

from hf_contaccum.bank import MemoryBank
from hf_contaccum.loss import ContAccumLoss


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


def test_bounded_memory_over_2000_micro_steps():
    """The failure that sank sentence-transformers PR #3612: a cache that grows every step."""
    torch.manual_seed(0)
    d, n = 128, 8  # the bank's size in samples is what matters here, not d
    encoder = torch.nn.Linear(d, d)
    loss_fn = ContAccumLoss(4096, temperature=0.05, similarity="cos")
    rss = []
    for step in range(2000):
        x = torch.randn(2 * n, d)
        out = encoder(x)
        q, p = out[:n], out[n:]
        keys = torch.arange(step * n, step * n + n)
        loss_fn(q, p, keys).backward()  # the backward enqueues the micro-batch
        if step >= 600 and step % 100 == 0:  # bank full after 512 micro-steps
            rss.append(_rss_mb())
    assert loss_fn.bank.fill == 4096 and loss_fn.bank.queries.shape == (4096, d)
    assert loss_fn.bank.num_enqueued == 2000 * n
    assert max(rss) <= rss[0] * 1.05, rss


@pytest.mark.parametrize("capacity, dim", [(4096, 384), (16384, 8), (1000, 4)])
def test_log_sum_exp_cache_never_exceeds_the_bank_vectors(capacity, dim):
    """The default chunk grows with N_mem / d: the cache stays below the bank's own 2 x N_mem x d floats
    (with fixed chunks of 16 it grows as N_mem^2 / 16: 67 MB against 1 MB of vectors at 16384 x 8)."""
    loss_fn = ContAccumLoss(capacity)
    vectors = torch.nn.functional.normalize(torch.randn(capacity, dim), dim=-1)
    loss_fn.enqueue(vectors, vectors, torch.arange(capacity))
    loss_fn.bank_lse.update(loss_fn.bank, torch.empty(0, dtype=torch.long), 1.0, True)
    assert 0 < loss_fn.bank_lse.nbytes() <= 2 * capacity * dim * 4


def test_automatic_chunk_matches_the_equations():
    from reference import naive_contaccum_loss

    torch.manual_seed(3)
    d, n, m = 2, 4, 40  # chunk = max(16, 40 / 2) = 20: two chunks
    loss_fn = ContAccumLoss(m, 0.5, mask_false_negatives=False)
    for _ in range(15):  # fills and wraps around
        q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        f = loss_fn.bank.fill
        bq = loss_fn.bank.queries[:f].clone() if f else torch.zeros(0, d)
        bp = loss_fn.bank.passages[:f].clone() if f else torch.zeros(0, d)
        loss = loss_fn(q, p, torch.arange(n))
        assert torch.allclose(loss, naive_contaccum_loss(q, p, None, bq, bp, None, 0.5), atol=1e-5)
        loss.backward()
    assert loss_fn.bank_lse.chunk_size == 20

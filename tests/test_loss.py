"""The loss against a literal implementation of the paper's equations (5-9)."""
import pytest
import torch
from reference import naive_contaccum_loss

from hf_contaccum.loss import ContAccumLoss


@pytest.mark.parametrize("bank_hn", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_gradients_match_naive_equations(bank_hn, mask, similarity):
    torch.manual_seed(0)
    d, n, H, m, tau = 16, 4, 2, 10, 0.5
    loss_fn = ContAccumLoss(m, m, temperature=tau, similarity=similarity, bank_hard_negatives=bank_hn,
                            mask_false_negatives=mask, chunk_size=3)  # chunk does not divide m: edge chunks
    for step in range(7):  # fills, wraps around twice
        q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        hn = torch.randn(n, H, d, requires_grad=True)
        # few distinct keys: many duplicates, so masking is exercised
        pk, hk = torch.randint(0, 6, (n,)), torch.randint(0, 6, (n, H))
        loss, stats = loss_fn(q, p, pk, hn, hk)
        grads = torch.autograd.grad(loss, [q, p, hn])

        bank = loss_fn.bank
        f = bank.fill
        if f:
            bq, bp, bpk = bank.queries[:f], bank.passages[:f], bank.passage_keys[:f]
            bh = bank.hard_negatives[:f] if bank_hn else None
            bhk = bank.hard_negative_keys[:f] if bank_hn else torch.zeros(f, 0, dtype=torch.long)
        else:
            bq = bp = torch.zeros(0, d)
            bpk = torch.zeros(0, dtype=torch.long)
            bh, bhk = None, torch.zeros(0, 0, dtype=torch.long)
        keys = {"p": pk, "hn": hk, "bp": bpk, "bhn": bhk} if mask else None
        ref = naive_contaccum_loss(q, p, hn, bq, bp, bh, tau, keys=keys, cos=similarity == "cos")
        ref_grads = torch.autograd.grad(ref, [q, p, hn])
        assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5), (step, loss, ref)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-6, rtol=1e-4), (step, (g - r).abs().max())
        assert stats.num_rows == n + f
        loss_fn.enqueue(q, p, pk, hn, hk)
    assert bank.fill == m


def test_passage_bank_only_and_smaller_query_bank():
    """Pre-batch negatives (query bank 0) and query bank < passage bank: banked rows are the newest."""
    torch.manual_seed(1)
    d, n = 8, 3
    for mq, mp in [(0, 9), (4, 9)]:
        loss_fn = ContAccumLoss(mq, mp, chunk_size=4, mask_false_negatives=False)
        for step in range(5):
            q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
            keys = torch.arange(step * n, step * n + n)
            loss, _ = loss_fn(q, p, keys)
            bank = loss_fn.bank
            f = bank.fill
            if f:
                rows = bank.newest(mq)
                bq, bp = bank.queries[rows], bank.passages[:f]
                # naive: banked rows are the newest mq entries; their targets the aligned positives
                cols = torch.cat([p, bp])
                S = torch.cat([q, bq]) @ cols.T
                targets = torch.cat([torch.arange(n), n + rows])
                ref = torch.nn.functional.cross_entropy(S, targets)
            else:
                ref = torch.nn.functional.cross_entropy(q @ p.T, torch.arange(n))
            g, r = torch.autograd.grad(loss, [q, p]), torch.autograd.grad(ref, [q, p])
            assert torch.allclose(loss, ref, atol=1e-5)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, r))
            loss_fn.enqueue(q, p, keys)


def test_without_bank_is_in_batch_infonce():
    torch.manual_seed(2)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    loss, stats = ContAccumLoss(0, 0, mask_false_negatives=False)(q, p, torch.arange(5))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(q @ p.T, torch.arange(5)))
    assert stats.num_columns == 5


def test_fp16_inputs_compute_in_fp32():
    q, p = (torch.randn(4, 8) * 30).half(), (torch.randn(4, 8) * 30).half()
    loss, _ = ContAccumLoss(0, 0)(q, p, torch.arange(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="must be >= 0"):
        ContAccumLoss(-1, 4)
    with pytest.raises(ValueError, match="passage bank at least as large"):
        ContAccumLoss(8, 4)
    with pytest.raises(ValueError, match="similarity"):
        ContAccumLoss(0, 0, similarity="l2")

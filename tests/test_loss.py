"""The loss against a literal implementation of the paper's equations (5-9)."""
import copy
import warnings
from functools import partial

import pytest
import torch
from helpers.references import naive_contaccum_loss
from helpers.syncs import RecordSyncingOps

from hf_contaccum.core.loss import ContAccumLoss


@pytest.mark.parametrize("bank_hn", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_gradients_match_naive_equations(bank_hn, mask, similarity, small_chunks):
    torch.manual_seed(0)
    d, n, H, m, tau = 16, 4, 2, 10, 0.5
    small_chunks(3)  # chunks of 3 do not divide m: edge chunks
    loss_fn = ContAccumLoss(m, tau, similarity, bank_hard_negatives=bank_hn, mask_false_negatives=mask)
    for step in range(7):  # fills, wraps around twice
        q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
        hn = torch.randn(n, H, d, requires_grad=True)
        # few distinct keys: many duplicates, so masking is exercised
        pk, hk = torch.randint(0, 6, (n,)), torch.randint(0, 6, (n, H))
        bank = loss_fn.bank
        f = bank.fill  # the bank as this micro-batch reads it (the backward below enqueues the micro-batch)
        if f:
            bq, bp, bpk = bank.queries[:f].clone(), bank.passages[:f].clone(), bank.passage_keys[:f].clone()
            bh = bank.hard_negatives[:f].clone() if bank_hn else None
            bhk = bank.hard_negative_keys[:f].clone() if bank_hn else torch.zeros(f, 0, dtype=torch.long)
        else:
            bq = bp = torch.zeros(0, d)
            bpk = torch.zeros(0, dtype=torch.long)
            bh, bhk = None, torch.zeros(0, 0, dtype=torch.long)
        loss = loss_fn(q, p, pk, hn, hk)
        stats = loss_fn.last_stats
        grads = torch.autograd.grad(loss, [q, p, hn])
        assert bank.num_enqueued == (step + 1) * n  # enqueued by the backward, after it read the bank
        keys = {"p": pk, "hn": hk, "bp": bpk, "bhn": bhk} if mask else None
        ref = naive_contaccum_loss(q, p, hn, bq, bp, bh, tau, keys=keys, cos=similarity == "cos")
        ref_grads = torch.autograd.grad(ref, [q, p, hn])
        assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5), (step, loss, ref)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-6, rtol=1e-4), (step, (g - r).abs().max())
        assert stats.num_rows == n + f
    assert bank.fill == m


def test_passage_bank_only_and_smaller_query_bank(small_chunks):
    """Pre-batch negatives (query bank 0) and query bank < passage bank: banked rows are the newest."""
    torch.manual_seed(1)
    d, n = 8, 3
    small_chunks(4)
    for mq, mp in [(0, 9), (4, 9)]:
        with pytest.warns(UserWarning, match="banked passages are negatives without their queries"):
            loss_fn = ContAccumLoss(mp, query_memory_bank_size=mq, mask_false_negatives=False)
        for step in range(5):
            q, p = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
            keys = torch.arange(step * n, step * n + n)
            bank = loss_fn.bank
            f = bank.fill
            if f:
                rows = bank.newest(mq)
                bq, bp = bank.queries[rows].clone(), bank.passages[:f].clone()
                # naive: banked rows are the newest mq entries; their targets the aligned positives
                cols = torch.cat([p, bp])
                S = torch.cat([q, bq]) @ cols.T
                targets = torch.cat([torch.arange(n), n + rows])
                ref = torch.nn.functional.cross_entropy(S, targets)
            else:
                ref = torch.nn.functional.cross_entropy(q @ p.T, torch.arange(n))
            loss = loss_fn(q, p, keys)
            g, r = torch.autograd.grad(loss, [q, p]), torch.autograd.grad(ref, [q, p])
            assert torch.allclose(loss, ref, atol=1e-5)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, r))


def test_without_bank_is_in_batch_infonce():
    torch.manual_seed(2)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    loss_fn = ContAccumLoss(0, mask_false_negatives=False)
    loss = loss_fn(q, p, torch.arange(5))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(q @ p.T, torch.arange(5)))
    assert loss_fn.last_stats.num_columns == 5


def test_fp16_inputs_compute_in_fp32():
    q, p = (torch.randn(4, 8) * 30).half(), (torch.randn(4, 8) * 30).half()
    loss = ContAccumLoss(0)(q, p, torch.arange(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="must be >= 0"):
        ContAccumLoss(4, query_memory_bank_size=-1)
    with pytest.raises(ValueError, match="memory_bank_size at least as large"):
        ContAccumLoss(4, query_memory_bank_size=8)
    with pytest.warns(UserWarning, match="4 banked passages are negatives without their queries"):
        ContAccumLoss(8, query_memory_bank_size=4)  # allowed, as an ablation (0: pre-batch negatives)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContAccumLoss(8), ContAccumLoss(0)  # equal banks, or none: nothing to warn about
    with pytest.raises(ValueError, match="similarity"):
        ContAccumLoss(0, similarity="l2")
    with pytest.raises(ValueError, match=r"smaller than one micro-batch of 8 pairs.*memory_bank_size >= 8"):
        ContAccumLoss(4)(torch.randn(8, 3, requires_grad=True), torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"hard_negatives has shape \(4, 3\)"):
        ContAccumLoss(8)(torch.randn(4, 3), torch.randn(4, 3), hard_negatives=torch.randn(4, 3))
    with pytest.raises(ValueError, match="one positive per query"):
        ContAccumLoss(8)(torch.randn(4, 3), torch.randn(5, 3))


def test_enqueue_waits_for_the_backward_and_hooks_do_not_pile_up():
    """The bank is read in place: the micro-batch joins it only once the backward has used it;
    eval mode or no grad neither reads nor writes it; hooks never stay on the caller's tensors."""
    q, p = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss_fn = ContAccumLoss(8)
    loss_fn.enqueue(torch.randn(4, 8), torch.randn(4, 8), torch.arange(100, 104))
    loss = loss_fn(q, p, torch.arange(4))
    assert loss_fn.bank.num_enqueued == 4
    loss.backward()
    assert loss_fn.bank.num_enqueued == 8 and not q._backward_hooks and not p._backward_hooks
    with torch.no_grad():
        loss_fn(q, p, torch.arange(4))
    loss_fn.eval()
    loss_fn(q, p, torch.arange(4)).backward()
    assert loss_fn.bank.num_enqueued == 8
    assert loss_fn.pop_log_stats()["negatives_per_query"] == 7.0  # one training micro-batch: 4 + 4 banked - 1
    # the contract: backward before the next micro-batch's forward. Breaking it is loud, never silent:
    loss_fn.train()
    first, second = loss_fn(q, p, torch.arange(4)), loss_fn(q, p, torch.arange(4))
    first.backward()  # enqueues into the bank that `second` read in place
    with pytest.raises(RuntimeError, match="inplace"):
        second.backward()


def test_grad_norm_ratio_is_taken_at_the_compared_unit_vectors():
    """With cosine: ||dL/d(unit passages)|| / ||dL/d(unit queries)||, whatever the raw vectors' lengths."""
    torch.manual_seed(4)
    q = (torch.randn(6, 8) * 5).requires_grad_()  # long raw queries
    p = (torch.randn(6, 8) * 0.2).requires_grad_()  # short raw passages
    loss_fn = ContAccumLoss(0, 0.05, "cos", mask_false_negatives=False)
    loss_fn(q, p, torch.arange(6)).backward()
    logged = loss_fn.pop_log_stats()
    qn = torch.nn.functional.normalize(q.detach(), dim=-1).requires_grad_()
    pn = torch.nn.functional.normalize(p.detach(), dim=-1).requires_grad_()
    torch.nn.functional.cross_entropy(qn @ pn.T / 0.05, torch.arange(6)).backward()
    assert logged["grad_norm_ratio"] == pytest.approx(float(pn.grad.norm() / qn.grad.norm()), rel=1e-4)
    assert logged["grad_norm_ratio_raw"] == pytest.approx(float(p.grad.norm() / q.grad.norm()), rel=1e-4)


@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_drift_probe_moves_every_banked_vector_and_the_loss_reads_them_moved(similarity, small_chunks):
    """The drift probe adds the change of the probe's mean query (passage) vector to every banked query (passage,
    hard negative), back onto the sphere for cosine; the next micro-batch's loss and gradients then equal the naive
    equations on the moved bank (the banked rows' cached log-sum-exps were rebuilt)."""
    torch.manual_seed(3)
    d, n, H, m, tau = 16, 4, 2, 10, 0.5
    small_chunks(3)
    loss_fn = ContAccumLoss(m, tau, similarity, bank_hard_negatives=True, bank_drift_probe=3)
    unit = (lambda v: torch.nn.functional.normalize(v, dim=-1)) if similarity == "cos" else (lambda v: v)
    probe_q, probe_p, drift = torch.randn(3, d), torch.randn(3, d), torch.randn(2, d)
    encoder_step = [0]
    encode = lambda features: (probe_q + encoder_step[0] * drift[0], probe_p + encoder_step[0] * drift[1])
    tokens = {side: {"input_ids": torch.ones(5, 7, dtype=torch.long), "attention_mask": torch.ones(5, 7)}
              for side in ("query", "passage")}
    for step in range(4):
        bank = loss_fn.bank
        before = [t[:bank.fill].clone() for t in (bank.queries, bank.passages, bank.hard_negatives)] if step else None
        encoder_step[0] = step
        loss_fn.begin_step(step)
        loss_fn.before_micro_batch(tokens, encode, torch.nn.Identity())  # the step's first micro-batch
        assert loss_fn.staleness.probe["query"]["input_ids"].shape == (3, 7)
        if step:
            expected_shift = [unit(probe_q + step * drift[0]).mean(0) - unit(probe_q + (step - 1) * drift[0]).mean(0),
                              unit(probe_p + step * drift[1]).mean(0) - unit(probe_p + (step - 1) * drift[1]).mean(0)]
            for moved, old, shift in zip((bank.queries, bank.passages, bank.hard_negatives), before,
                                         (expected_shift[0], expected_shift[1], expected_shift[1])):
                assert torch.allclose(moved[:bank.fill], unit(old + shift), atol=1e-6)
        for micro in range(2):  # two micro-batches a step, new passages each (none masked as a duplicate)
            q, p, hn = (torch.randn(*shape, requires_grad=True) for shape in ((n, d), (n, d), (n, H, d)))
            f = bank.fill
            bq, bp = (bank.queries[:f].clone(), bank.passages[:f].clone()) if f else (torch.zeros(0, d),) * 2
            bh = bank.hard_negatives[:f].clone() if f else torch.zeros(0, H, d)
            loss = loss_fn(q, p, torch.arange(n) + 10 * (2 * step + micro), hn, None)
            ref = naive_contaccum_loss(q, p, hn, bq, bp, bh, tau, cos=similarity == "cos")
            assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5), (step, loss, ref)
            for g, r in zip(torch.autograd.grad(loss, [q, p, hn]), torch.autograd.grad(ref, [q, p, hn])):
                assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_retired_settings_are_refused_with_the_reason_and_renamed_ones_still_work():
    for name, value in (("bank_weight", 0.5), ("bank_warmup_steps", 3), ("bank_chunk_size", 64)):
        with pytest.raises(ValueError, match=f"{name} was retired in hf_contaccum 0.2.0: .*CHANGELOG"):
            ContAccumLoss(8, **{name: value})
    ContAccumLoss(8, bank_weight=1.0, bank_warmup_steps=0)  # their old defaults: accepted for one release
    with pytest.warns(FutureWarning, match="query_memory_bank_size"):
        assert ContAccumLoss(8, query_bank_size=8).query_bank_size == 8


def test_a_non_finite_loss_raises_at_once_or_at_check_finite_when_deferred():
    q, p = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    bad = q * float("nan")
    with pytest.raises(FloatingPointError, match="contrastive loss is nan"):
        ContAccumLoss(8)(bad, p)
    loss_fn = ContAccumLoss(8)
    loss_fn.defer_finite_check_to_step()  # what the trainers' lifecycle does: no host sync per micro-batch
    assert loss_fn.finite.deferred
    loss_fn(q, p).backward()
    loss_fn(bad, p).backward()  # no error yet
    loss_fn(q, p).backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        loss_fn.check_finite()
    loss_fn.check_finite()  # the flag was consumed: the next step starts clean


@pytest.mark.gpu
@pytest.mark.parametrize("similarity, bank_hn, query_bank", [("cos", True, None), ("dot", False, 12)])
def test_a_training_micro_step_makes_no_host_sync(similarity, bank_hn, query_bank):
    """Forward, backward and the enqueue with its cache refresh, with finiteness checked once per step as
    both trainers do: nothing reads a device value on the host, through bank wrap-arounds, chunk sweeps and
    (with a smaller query bank) the newest-rows path. On a GPU set_sync_debug_mode also fails on host-made
    tensors copied to the device (a slot index made on the host had cost a sync per enqueue)."""
    from helpers.trainers import DEVICE

    torch.manual_seed(0)
    n, d, h = 4, 8, 2
    loss_fn = ContAccumLoss(20, 0.1, similarity, query_memory_bank_size=query_bank, bank_hard_negatives=bank_hn)
    loss_fn.cache.requested_chunk_size = 6
    loss_fn.defer_finite_check_to_step()

    def micro_step(i):
        leaves = [torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((n, d), (n, d), (n, h, d))]
        keys = torch.arange(n, device=DEVICE) + n * i
        negative_keys = torch.arange(n * h, device=DEVICE).view(n, h) + 1000 + n * h * i
        loss_fn(*leaves[:2], keys, leaves[2], negative_keys).backward()

    for i in range(6):  # the bank fills and the cache is built: allocations and the first rebuild may sync
        micro_step(i)
    recorder = RecordSyncingOps()
    if DEVICE.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with recorder:
            for i in range(6, 20):  # 14 micro-steps of 4 into a bank of 20 in chunks of 6: every write pattern
                micro_step(i)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert recorder.seen == [], sorted(set(recorder.seen))
    loss_fn.check_finite()  # the one read per optimizer step
    assert loss_fn.bank.num_enqueued == 80


def test_the_loss_is_fp32_under_bf16_autocast_and_keeps_no_copy_of_the_bank():
    """Under the Trainer's bf16 autocast the logits are still fp32 (loss and gradients equal the fp32 loss's), and
    nothing the backward keeps is a copy of the bank: autocast had cast the N_mem x d bank to bf16 for each product
    and kept those copies for the backward (at N_mem 65,536 x 768 the excess over vectors and cache on an H200)."""
    torch.manual_seed(0)
    n, d, h, capacity = 4, 16, 1, 64
    loss_fn = ContAccumLoss(capacity, 0.05, "cos", bank_hard_negatives=True)
    for i in range(capacity // n):
        loss_fn.enqueue(torch.randn(n, d), torch.randn(n, d), torch.arange(n) + n * i, torch.randn(n, h, d),
                        torch.arange(n * h).view(n, h) + 10**6 + n * h * i)
    inputs = [torch.randn(*shape) for shape in ((n, d), (n, d), (n, h, d))]
    keys, negative_keys = torch.arange(n) - 100, torch.arange(n * h).view(n, h) - 10**5

    def loss_and_grads(autocast):
        leaves = [x.clone().requires_grad_() for x in inputs]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = copy.deepcopy(loss_fn)(leaves[0], leaves[1], keys, leaves[2], negative_keys)  # reads the bank
        loss.backward()
        return loss, [x.grad for x in leaves], saved

    fp32, fp32_grads, _ = loss_and_grads(False)
    bf16, bf16_grads, saved = loss_and_grads(True)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, fp32, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(bf16_grads, fp32_grads))
    bank_rows = [t for t in saved if t.dim() == 2 and max(t.shape) >= capacity]  # (the banked side, or its transpose)
    assert bank_rows and not [t for t in bank_rows if t.is_floating_point() and t.dtype != torch.float32]


def _collapse_step(loss_fn, queries, positives, patience, keys=None):
    keys = torch.arange(len(queries)) if keys is None else keys
    loss_fn(queries.requires_grad_(), positives, keys).backward()
    loss_fn.check_collapse(patience)


def _alike(common):  # cos ~0.9999 between any two: spread ~1e-3, above the every-vector-the-same threshold
    return common + 0.05 * torch.randn(8, 16)


def test_collapse_guard_catches_a_loss_back_at_uniform_once_the_run_had_learned():
    """The collapse measured from scratch: vectors that still differ (spread above the guard's threshold) but
    score every candidate alike, after the run had learned; a run that never left that loss is not stopped."""
    from hf_contaccum import EmbeddingCollapseError

    torch.manual_seed(0)
    common = torch.randn(1, 16)
    alike = partial(_alike, common)
    never_learned = ContAccumLoss(0, 1.0, "cos")
    for _ in range(5):
        _collapse_step(never_learned, alike(), alike(), patience=3)  # at uniform from the start: not stopped
    loss_fn = ContAccumLoss(0, 1.0, "cos")  # no bank: every step's loss is its own vectors'
    distinct = torch.eye(16)[:8] * 5
    _collapse_step(loss_fn, distinct.clone(), distinct.clone(), patience=3)  # learned: well below uniform
    for _ in range(2):
        _collapse_step(loss_fn, alike(), alike(), patience=3)
    with pytest.raises(EmbeddingCollapseError, match=r"for 3 optimizer steps the loss was [01]\.\d{3} x .* after it had"):
        _collapse_step(loss_fn, alike(), alike(), patience=3)


def test_collapse_guard_stops_a_bank_run_that_never_leaves_the_uniform_loss():
    """The from-scratch failure at lr 1e-4: with a bank, the loss never left the log of its candidates. Stopped after
    5 x patience steps of it while reading the bank; the same vectors without a bank are not stopped (a run may
    start at the uniform loss), nor is a bank run whose loss is below it."""
    from hf_contaccum import EmbeddingCollapseError

    torch.manual_seed(0)
    alike = partial(_alike, torch.randn(1, 16))
    no_bank = ContAccumLoss(0, 1.0, "cos")
    learning = ContAccumLoss(8, 0.05, "cos")
    distinct = torch.eye(16)[:8]
    for _ in range(12):
        _collapse_step(no_bank, alike(), alike(), patience=2)
        _collapse_step(learning, distinct.clone(), distinct.clone(), patience=2)
    stuck = ContAccumLoss(8, 1.0, "cos")
    steps = [torch.arange(8) + 8 * step for step in range(11)]  # new passages each step: none masked as a duplicate
    _collapse_step(stuck, alike(), alike(), 2, steps[0])  # the bank is empty: not counted
    for keys in steps[1:10]:
        _collapse_step(stuck, alike(), alike(), 2, keys)
    with pytest.raises(EmbeddingCollapseError, match=r"for 10 optimizer steps .* while reading the memory bank.*"
                                                     r"bank_refresh_steps=1"):
        _collapse_step(stuck, alike(), alike(), 2, steps[10])

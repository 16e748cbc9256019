"""The objective beyond query -> passage (sentence-transformers' directions, partition modes, hardness weighting,
any similarity) over the current batch and the memory bank, against a literal implementation."""
import functools

import pytest
import torch
from helpers.references import naive_contaccum_loss, naive_extended_loss
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim, manhattan_sim

from hf_contaccum import ContAccumLoss
from hf_contaccum.core.objective import Objective

OBJECTIVES = [
    Objective(("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),  # GTE's
    Objective(("query_to_doc", "doc_to_query"), "per_direction"),  # symmetric InfoNCE
    Objective(("query_to_doc",), "joint", "in_batch_negatives", 9.0),
    Objective(("query_to_doc",), "joint", "hard_negatives", 5.0),
    Objective(("query_to_doc", "doc_to_query"), "joint", "all_negatives", 2.0),
]


def _run_against_reference(loss_fn, objective, similarity, scale, bank_hn, steps=7):
    torch.manual_seed(0)
    d, n, h = 8, 4, 2
    for step in range(steps):  # the bank (of 10) fills and wraps around
        q, p, hn = (torch.randn(*shape, requires_grad=True) for shape in ((n, d), (n, d), (n, h, d)))
        bank = loss_fn.bank
        f = bank.fill
        bq, bp = (bank.queries[:f].clone(), bank.passages[:f].clone()) if f else (torch.zeros(0, d),) * 2
        bh = bank.hard_negatives[:f].clone() if f and bank_hn else (torch.zeros(0, h, d) if bank_hn else None)
        loss = loss_fn(q, p, torch.arange(n) + n * step, hn, torch.arange(n * h).view(n, h) + 1000 + n * h * step)
        ref = naive_extended_loss(q, p, hn, bq, bp, bh, scale, similarity, objective.directions,
                                  objective.partition_mode, objective.hardness_mode, objective.hardness_strength)
        assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5), (step, loss, ref)
        grads, ref_grads = torch.autograd.grad(loss, [q, p, hn]), torch.autograd.grad(ref, [q, p, hn])
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), (step, (g - r).abs().max())
    assert loss_fn.bank.fill == 10


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{'+'.join(o.directions)}-{o.partition_mode}-"
                                                               f"{o.hardness_mode}")
@pytest.mark.parametrize("bank_hn", [False, True])
def test_directions_and_hardness_with_a_bank_equal_the_literal_objective(objective, bank_hn):
    """Every row, current and banked, against every candidate of every direction, banked ones constants."""
    loss_fn = ContAccumLoss(10, 1 / 20, "cos", bank_hard_negatives=bank_hn, mask_false_negatives=False,
                            objective=objective)
    _run_against_reference(loss_fn, objective, cos_sim, 20.0, bank_hn)


@pytest.mark.parametrize("similarity", [euclidean_sim, manhattan_sim, dot_score], ids=lambda f: f.__name__)
def test_any_similarity_function_with_a_bank_equals_the_literal_objective(similarity):
    """A similarity other than cos / dot: the bank holds the raw vectors, every score is the function's."""
    loss_fn = ContAccumLoss(10, 1.0, similarity, mask_false_negatives=False)
    assert loss_fn.extended  # the core knows "dot" and "cos" by name; a function goes the general way
    _run_against_reference(loss_fn, Objective(), similarity, 1.0, False)


def test_the_general_path_equals_the_cached_one_on_the_default_objective():
    """The default objective through the general computation (a partial of cos_sim is not recognised as cos
    inside the core) equals the incremental cache's, on the same vectors."""
    torch.manual_seed(1)
    fast = ContAccumLoss(12, 0.05, "cos", mask_false_negatives=True)
    general = ContAccumLoss(12, 0.05, functools.partial(cos_sim), mask_false_negatives=True)
    assert general.extended and not fast.extended
    for step in range(6):
        q, p = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
        keys = torch.randint(0, 5, (4,)) + 10 * step
        a, b = fast(q, p, keys), general(q, p, keys)
        assert torch.allclose(a, b, atol=1e-5), (step, a, b)
        for x, y in zip(torch.autograd.grad(a, [q, p]), torch.autograd.grad(b, [q, p])):
            assert torch.allclose(x, y, atol=1e-5)


def test_the_literal_objective_is_the_paper_loss_on_its_default():
    """The reference itself: on query -> passage alone it is the paper's equations (naive_contaccum_loss)."""
    torch.manual_seed(2)
    q, p, bq, bp = torch.randn(4, 8), torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8)
    a = naive_extended_loss(q, p, None, bq, bp, None, 1.0, dot_score)
    assert torch.allclose(a, naive_contaccum_loss(q, p, None, bq, bp, None, 1.0))


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="must include 'query_to_doc'"):
        Objective(("doc_to_query",))
    with pytest.raises(ValueError, match="per_direction"):
        Objective(("query_to_doc", "query_to_query"), "per_direction")
    with pytest.raises(ValueError, match="hardness_mode"):
        Objective(hardness_mode="everything")
    with pytest.raises(ValueError, match="hardness_strength"):
        Objective(hardness_mode="hard_negatives", hardness_strength=-1.0)

"""Retrieval metrics against pytrec_eval (trec_eval's reference implementation)."""
import pytest
import torch

from hf_contaccum.evaluation import RetrievalEvaluator, compute_metrics, rank_run

pytrec_eval = pytest.importorskip("pytrec_eval")


def _fixture():
    # several relevant docs per query, graded relevance, ties in scores, a relevant doc never retrieved
    run = {
        "q1": {"d1": 0.9, "d2": 0.9, "d3": 0.5, "d4": 0.4, "d5": 0.4, "d6": 0.1},
        "q2": {"d1": 0.3, "d2": 0.8, "d3": 0.8, "d4": 0.8, "d7": 0.2},
        "q3": {"d5": 1.0, "d6": 0.0, "d2": 0.7},
    }
    qrels = {
        "q1": {"d2": 2, "d5": 1, "d9": 1},
        "q2": {"d1": 1, "d4": 3},
        "q3": {"d6": 1, "d3": 0},
    }
    return run, qrels


def test_metrics_equal_pytrec_eval():
    run, qrels = _fixture()
    ks = (1, 3, 5)
    ours = compute_metrics(rank_run(run), qrels, ks)
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"map_cut.{','.join(map(str, ks))}",
                f"recall.{','.join(map(str, ks))}", "recip_rank"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mean = lambda key: sum(ref[q][key] for q in ref) / len(ref)
    for k in ks:
        assert ours[f"ndcg@{k}"] == pytest.approx(mean(f"ndcg_cut_{k}")), k
        assert ours[f"map@{k}"] == pytest.approx(mean(f"map_cut_{k}")), k
        assert ours[f"recall@{k}"] == pytest.approx(mean(f"recall_{k}")), k
    # MRR with a cut-off larger than every ranking equals trec_eval's recip_rank
    assert compute_metrics(rank_run(run), qrels, (100,))["mrr@100"] == pytest.approx(mean("recip_rank"))
    # Top-k accuracy by hand: q1 top1 d2 (ties by doc id desc) relevant, q2 top1 d4 relevant, q3 top1 d5 not
    assert ours["accuracy@1"] == pytest.approx(2 / 3)


class _StubEncoder:
    """Encodes text i as the i-th basis vector scaled by a per-text score (no model needed)."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_queries(self, texts, *args, **kwargs):
        return torch.stack([self.vectors[t] for t in texts])

    encode_passages = encode_queries


def test_evaluator_end_to_end_and_bad_input():
    vectors = {"qa": torch.tensor([1.0, 0, 0]), "qb": torch.tensor([0, 1.0, 0]), "qc": torch.tensor([0, 0, 1.0]),
               "da": torch.tensor([1.0, 0.1, 0]), "db": torch.tensor([0.2, 1.0, 0]), "dc": torch.tensor([0, 0.3, 0.1])}
    queries = {"1": "qa", "2": "qb", "3": "qc"}
    corpus = {"a": "da", "b": "db", "c": "dc"}
    qrels = {"1": {"a": 1}, "2": {"c": 1}, "3": {}}
    ev = RetrievalEvaluator(queries, corpus, qrels, k_values=(1, 2), show_progress=False, name="toy")
    metrics = ev(_StubEncoder(vectors))
    assert ev.skipped_queries == 1  # q3 has no relevant document
    assert metrics["toy_accuracy@1"] == pytest.approx(0.5)
    assert metrics["toy_recall@2"] == pytest.approx(1.0)  # q2: b then c
    assert metrics["toy_mrr@2"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="not in the corpus"):
        RetrievalEvaluator(queries, corpus, {"1": {"zzz": 1}})
    with pytest.raises(ValueError, match="empty corpus"):
        RetrievalEvaluator(queries, {}, qrels)
    with pytest.raises(ValueError, match="no query has a relevant document"):
        RetrievalEvaluator(queries, corpus, {"3": {}})

"""Retrieval evaluation: metrics as trec_eval defines them, exact search, the evaluator used in training."""
from .evaluator import RetrievalEvaluator
from .metrics import METRICS, RETRIEVAL_METRICS, compute_metrics, rank_run

__all__ = ["METRICS", "RETRIEVAL_METRICS", "RetrievalEvaluator", "compute_metrics", "rank_run"]

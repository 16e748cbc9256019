"""Retrieval metrics as trec_eval defines them (checked against pytrec_eval in the tests).

Ranking by score, ties broken by document id descending as trec_eval does; nDCG with graded gains
and log2 discount; Recall, MRR, MAP (AP@k normalised by all relevant documents, as trec_eval's
map_cut) and Top-k accuracy (DPR's metric: any relevant document in the top k).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

METRICS = ("ndcg", "recall", "mrr", "map", "accuracy")
# the same metrics as an `evaluate` module: evaluate.load(RETRIEVAL_METRICS)
RETRIEVAL_METRICS = str(Path(__file__).parent.parent / "resources" / "retrieval_metrics.py")


def rank_run(run: dict) -> dict:
    """{qid: {did: score}} -> {qid: [did, ...]} best first, ties by doc id descending (trec_eval)."""
    return {qid: [d for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)]
            for qid, docs in run.items()}


def compute_metrics(ranked: dict, qrels: dict, k_values=(1, 10, 100)) -> dict:
    """Mean metrics over the queries of `qrels` that have at least one relevant document.

    ranked: {qid: [did best first]}; qrels: {qid: {did: relevance}} (relevance > 0 is relevant).
    """
    per_metric = {f"{m}@{k}": [] for m in METRICS for k in k_values}
    for qid, judged in qrels.items():
        relevant = {d: r for d, r in judged.items() if r > 0}
        if not relevant:
            continue
        docs = ranked.get(qid, [])
        ideal = sorted(relevant.values(), reverse=True)
        for k in k_values:
            top = docs[:k]
            hits = [relevant.get(d, 0) for d in top]
            dcg = sum(g / math.log2(i + 2) for i, g in enumerate(hits))
            idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
            per_metric[f"ndcg@{k}"].append(dcg / idcg)
            found = [i for i, g in enumerate(hits) if g > 0]
            per_metric[f"recall@{k}"].append(len(found) / len(relevant))
            per_metric[f"mrr@{k}"].append(1.0 / (found[0] + 1) if found else 0.0)
            per_metric[f"map@{k}"].append(sum((j + 1) / (i + 1) for j, i in enumerate(found)) / len(relevant))
            per_metric[f"accuracy@{k}"].append(1.0 if found else 0.0)
    if not per_metric[f"ndcg@{k_values[0]}"]:
        raise ValueError("no query has a relevant document in qrels: nothing to evaluate")
    return {name: float(np.mean(values)) for name, values in per_metric.items()}

"""Retrieval evaluation: exact inner-product search with FAISS and the usual IR metrics.

Metrics follow trec_eval's definitions (checked against pytrec_eval in the tests):
ranking by score, ties broken by document id descending as trec_eval does; nDCG with
graded gains rel and log2 discount; Recall, MRR, MAP (AP@k normalised by all relevant
documents, as trec_eval's map_cut) and Top-k accuracy (DPR's metric: any relevant in top k).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

METRICS = ("ndcg", "recall", "mrr", "map", "accuracy")
# the same metrics as an `evaluate` module: evaluate.load(RETRIEVAL_METRICS)
RETRIEVAL_METRICS = str(Path(__file__).parent / "resources" / "retrieval_metrics.py")


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


def _faiss_search(queries: np.ndarray, passages: np.ndarray, k: int):
    # faiss logs at INFO that it could not load its AVX2/AVX512 build: noise, not an error
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    index = faiss.IndexFlatIP(passages.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(passages)
    return index.search(queries, min(k, passages.shape[0]))


class RetrievalEvaluator:
    """Encode queries and corpus with a BiEncoder, search exactly, score against qrels.

    queries {qid: text}, corpus {did: text}, qrels {qid: {did: relevance}}. Queries
    without any relevant document are skipped (and counted in `skipped_queries`);
    a qrels document missing from the corpus is an error, since it would silently
    cap every metric below 1.
    """

    def __init__(self, queries: dict, corpus: dict, qrels: dict, k_values=(1, 10, 100), batch_size=128,
                 query_max_length=64, passage_max_length=256, similarity=None, name="", show_progress=True):
        if not corpus:
            raise ValueError("empty corpus: give the evaluator at least one document")
        missing = sorted({d for judged in qrels.values() for d in judged} - set(corpus))
        if missing:
            raise ValueError(f"{len(missing)} qrels documents are not in the corpus (e.g. {missing[:3]}): "
                             "add them to the corpus or drop them from qrels")
        unknown = sorted(set(qrels) - set(queries))
        if unknown:
            raise ValueError(f"{len(unknown)} qrels queries have no text in queries (e.g. {unknown[:3]})")
        self.qrels = {q: j for q, j in qrels.items() if any(r > 0 for r in j.values())}
        self.skipped_queries = len(queries) - len(self.qrels)
        if not self.qrels:
            raise ValueError("no query has a relevant document in qrels: nothing to evaluate")
        self.query_ids = list(self.qrels)
        self.queries = [queries[q] for q in self.query_ids]
        self.doc_ids = list(corpus)
        self.corpus = [corpus[d] for d in self.doc_ids]
        self.k_values = tuple(sorted(k_values))
        self.batch_size, self.similarity, self.name = batch_size, similarity, name
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.show_progress = show_progress

    def search(self, model, tokenizer=None):
        q = model.encode_queries(self.queries, self.batch_size, self.query_max_length, tokenizer, self.show_progress)
        p = model.encode_passages(self.corpus, self.batch_size, self.passage_max_length, tokenizer, self.show_progress)
        # default: the similarity the model was trained with (BiEncoder.config.similarity)
        similarity = self.similarity or getattr(getattr(model, "config", None), "similarity", "dot")
        if similarity == "cos":
            q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
        scores, idx = _faiss_search(q.numpy().astype(np.float32), p.numpy().astype(np.float32), max(self.k_values))
        return {qid: {self.doc_ids[j]: float(s) for s, j in zip(srow, irow) if j >= 0}
                for qid, srow, irow in zip(self.query_ids, scores, idx)}

    def __call__(self, model, tokenizer=None) -> dict:
        run = self.search(model, tokenizer)
        metrics = compute_metrics(rank_run(run), self.qrels, self.k_values)
        prefix = f"{self.name}_" if self.name else ""
        return {prefix + k: v for k, v in metrics.items()}

"""RetrievalEvaluator: encode queries and a corpus held in memory, search exactly, score against qrels."""
from __future__ import annotations

import numpy as np

from ..settings import normalize
from .metrics import compute_metrics, rank_run
from .search import exact_search


class RetrievalEvaluator:
    """Encode queries and corpus with a BiEncoder, search exactly, score against qrels.

    queries {qid: text}, corpus {did: text}, qrels {qid: {did: relevance}}. Queries
    without any relevant document are skipped (and counted in `skipped_queries`);
    a qrels document missing from the corpus is an error, since it would silently
    cap every metric below 1.
    """

    def __init__(self, queries: dict, corpus: dict, qrels: dict, k_values=(1, 10, 100), batch_size=128,
                 query_max_length=None, passage_max_length=None, similarity=None, name="", show_progress=True):
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
        q, p = normalize(q, similarity), normalize(p, similarity)
        scores, idx = exact_search(q.numpy().astype(np.float32), p.numpy().astype(np.float32), max(self.k_values))
        return {qid: {self.doc_ids[j]: float(s) for s, j in zip(srow, irow) if j >= 0}
                for qid, srow, irow in zip(self.query_ids, scores, idx)}

    def __call__(self, model, tokenizer=None) -> dict:
        run = self.search(model, tokenizer)
        metrics = compute_metrics(rank_run(run), self.qrels, self.k_values)
        prefix = f"{self.name}_" if self.name else ""
        return {prefix + k: v for k, v in metrics.items()}

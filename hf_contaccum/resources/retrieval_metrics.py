"""hf_contaccum's retrieval metrics as a Hugging Face `evaluate` module.

    import evaluate
    from hf_contaccum.evaluation import RETRIEVAL_METRICS
    metric = evaluate.load(RETRIEVAL_METRICS)
    metric.compute(predictions=[["d3", "d1", "d7"]], references=[["d1"]], k_values=[1, 10])
    # {'ndcg@1': 0.0, 'recall@1': 0.0, ..., 'ndcg@10': 0.63, 'mrr@10': 0.5, ...}

predictions: per query, the retrieved document ids, best first; references: per query,
the relevant document ids (binary relevance; for graded relevance use
hf_contaccum.evaluation.compute_metrics directly). Definitions follow trec_eval.
"""
import datasets
import evaluate

from hf_contaccum.evaluation import compute_metrics


class RetrievalMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="nDCG@k, Recall@k, MRR@k, MAP@k and Top-k accuracy of ranked retrieval, as trec_eval "
                        "defines them (hf_contaccum).",
            citation="",
            inputs_description=__doc__,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, k_values=(1, 10, 100)):
        ranked = {str(i): list(docs) for i, docs in enumerate(predictions)}
        qrels = {str(i): dict.fromkeys(relevant, 1) for i, relevant in enumerate(references)}
        return compute_metrics(ranked, qrels, tuple(sorted(k_values)))

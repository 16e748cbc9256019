"""TREC run files: the results of a search, written, read, and scored against qrels.

A run line is `query_id Q0 doc_id rank score tag` (trec_eval's format; ranks from 1, scores descending).
"""
from __future__ import annotations


def write_trec_run(run: dict, path: str, tag: str = "hf_contaccum") -> None:
    """run: {query id: {doc id: score}}; written best first per query (ties by doc id, descending, as trec_eval)."""
    from ..evaluation.metrics import rank_run

    ranked = rank_run(run)
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in ranked.items():
            for rank, did in enumerate(docs, 1):
                for name, value in (("query", qid), ("document", did)):
                    if any(c.isspace() for c in str(value)):
                        raise ValueError(f"{name} id {value!r} holds white space: a TREC run cannot hold it")
                f.write(f"{qid} Q0 {did} {rank} {run[qid][did]:.6f} {tag}\n")


def read_trec_run(path: str) -> dict:
    """{query id: {doc id: score}} from a TREC run file; a malformed line is an error naming the file and line."""
    run: dict = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 6:
                raise ValueError(f"{path}:{number}: a TREC run line has 6 fields (qid Q0 docid rank score tag), "
                                 f"got {len(fields)}: {line.strip()[:80]!r}")
            try:
                run.setdefault(fields[0], {})[fields[2]] = float(fields[4])
            except ValueError:
                raise ValueError(f"{path}:{number}: the score {fields[4]!r} is not a number") from None
    if not run:
        raise ValueError(f"{path}: no run lines")
    return run


def evaluate_run(run: dict, qrels: dict, k_values=(1, 10, 100)) -> dict:
    """The metrics of a run against qrels, computed by the `evaluate` module this library ships
    (hf_contaccum/resources/retrieval_metrics.py: trec_eval's definitions). Graded relevance counts as relevant
    (> 0); for graded nDCG use hf_contaccum.evaluation.compute_metrics."""
    import evaluate

    from ..evaluation.metrics import RETRIEVAL_METRICS, rank_run

    ranked = rank_run(run)
    judged = [q for q, docs in qrels.items() if any(r > 0 for r in docs.values())]
    metric = evaluate.load(RETRIEVAL_METRICS)
    return metric.compute(predictions=[ranked.get(q, []) for q in judged],
                          references=[[d for d, r in qrels[q].items() if r > 0] for q in judged],
                          k_values=list(k_values))

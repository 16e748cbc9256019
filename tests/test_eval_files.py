"""Evaluation file readers (BEIR and TREC formats, errors with file and line) and the `evaluate` module."""
import random

import pytest

from hf_contaccum.data.files import read_corpus, read_qrels, read_queries
from hf_contaccum.evaluation import RETRIEVAL_METRICS, compute_metrics, rank_run


@pytest.mark.parametrize("text", [
    "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td3\t1\n",   # BEIR with its header
    "q1\td1\t1\nq1\td2\t2\nq2\td3\t1\n",                              # no header: the first judgment is kept
    "q1 0 d1 1\nq1 0 d2 2\nq2 0 d3 1\n",                              # TREC, spaces
    "q1\t0\td1\t1\n\nq1\t0\td2\t2\nq2\t0\td3\t1\n",                   # TREC, tabs, a blank line
])
def test_qrels_formats(tmp_path, text):
    path = tmp_path / "qrels.txt"
    path.write_text(text)
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("q1\td1\t1\nq1\td2\thigh\n")
    with pytest.raises(ValueError, match=r"qrels.tsv:2: the score 'high' is not a number"):
        read_qrels(path)
    path.write_text("q1\td1\t1\nq1 d2\n")
    with pytest.raises(ValueError, match=r"qrels.tsv:2: expected 3 columns .* got 2"):
        read_qrels(path)
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "a"}\n{"id": "q2", "text": "b"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:2: not a query line \(KeyError"):
        read_queries(queries)


def test_queries_and_corpus_in_jsonl_and_tsv(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"_id": 1, "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    assert read_queries(tmp_path / "q.jsonl") == {"1": "first", "q2": "second"}
    (tmp_path / "q.tsv").write_text("id\ttext\nq1\tfirst\n")
    assert read_queries(tmp_path / "q.tsv") == {"q1": "first"}
    (tmp_path / "c.jsonl").write_text('{"_id": "d1", "title": "T", "text": "body"}\n')
    (tmp_path / "c.tsv").write_text("d1\tbody\tT\n")
    assert read_corpus(tmp_path / "c.jsonl") == read_corpus(tmp_path / "c.tsv") == {"d1": "T body"}


def test_evaluate_module_equals_our_metrics_and_trec_eval():
    evaluate = pytest.importorskip("evaluate")
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(30)]
    predictions = [rng.sample(docs, 12) for _ in range(20)]
    references = [rng.sample(docs, rng.randint(1, 3)) for _ in range(20)]
    got = evaluate.load(RETRIEVAL_METRICS).compute(predictions=predictions, references=references, k_values=[1, 5, 10])
    ranked = {str(i): p for i, p in enumerate(predictions)}
    qrels = {str(i): dict.fromkeys(r, 1) for i, r in enumerate(references)}
    assert got == pytest.approx(compute_metrics(ranked, qrels, (1, 5, 10)))
    run = {q: {d: float(len(p) - j) for j, d in enumerate(p)} for q, p in ranked.items()}
    assert rank_run(run) == ranked
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10"}).evaluate(run)
    assert got["ndcg@10"] == pytest.approx(sum(v["ndcg_cut_10"] for v in trec.values()) / len(trec))
    assert got["recall@10"] == pytest.approx(sum(v["recall_10"] for v in trec.values()) / len(trec))

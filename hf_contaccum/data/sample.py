"""The embedded default: a WordNet 3.0 extract shipped with the package (license beside it).

Task: reverse dictionary. A query is a synset's definition; its relevant passage is the
synset's lemmas with their part of speech. Training uses 'train' synsets only; the
evaluation queries are 'test' synsets, searched over the passages of every synset in
the extract. Synsets with the same passage text are one document (all relevant).
"""
from __future__ import annotations

import gzip
import json
from importlib import resources


def _rows():
    path = resources.files("hf_contaccum") / "resources" / "wordnet_sample.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def passage_text(row) -> str:
    return f"{', '.join(l.replace('_', ' ') for l in row['lemmas'])} ({row['pos']})"


def load_wordnet_sample(max_train=None, max_eval_queries=None, max_corpus=None):
    """Returns (train Dataset[query, positive, positive_id], eval queries, corpus, qrels).

    max_corpus caps the corpus (relevant documents of the evaluation queries always stay).
    """
    from datasets import Dataset

    rows = _rows()
    doc_of_text = {}
    for row in rows:
        doc_of_text.setdefault(passage_text(row), f"d{len(doc_of_text)}")
    corpus = {did: text for text, did in doc_of_text.items()}
    train = [r for r in rows if r["split"] == "train"][:max_train]
    test = [r for r in rows if r["split"] == "test"][:max_eval_queries]
    train_ds = Dataset.from_dict({
        "query": [r["definition"] for r in train],
        "positive": [passage_text(r) for r in train],
        "positive_id": [doc_of_text[passage_text(r)] for r in train],
    })
    docs_of_definition = {}  # a definition shared by several synsets makes all of them relevant
    for row in rows:
        docs_of_definition.setdefault(row["definition"], set()).add(doc_of_text[passage_text(row)])
    queries = {r["id"]: r["definition"] for r in test}
    qrels = {r["id"]: {did: 1 for did in sorted(docs_of_definition[r["definition"]])} for r in test}
    if max_corpus is not None:
        keep = {did for judged in qrels.values() for did in judged}
        keep |= set([did for did in corpus if did not in keep][: max(0, max_corpus - len(keep))])
        corpus = {did: text for did, text in corpus.items() if did in keep}
    return train_ds, queries, corpus, qrels

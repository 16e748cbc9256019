"""Reading evaluation files: queries, corpus and qrels, in BEIR's formats and TREC's.

    queries   .jsonl: {"_id": "q1", "text": "..."} per line      .tsv: q1<TAB>text
    corpus    .jsonl: {"_id": "d1", "title": "...", "text": "..."} .tsv: d1<TAB>text[<TAB>title]
    qrels     BEIR: query-id<TAB>corpus-id<TAB>score (a header line is recognised and skipped)
              TREC: qid 0 docid relevance (4 columns; tabs or spaces)

Every error names the file and the line.
"""
from __future__ import annotations

import json


def _lines(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line.rstrip("\n\r")


def _read_texts(path, kind, with_title):
    texts = {}
    for number, line in _lines(path):
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                key, text = str(row["_id"]), row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a {kind} line ({type(err).__name__}: {err}); expected "
                                 '{"_id": ..., "text": ...}') from None
            if with_title and row.get("title"):
                text = f"{row['title']} {text}"
        else:
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}:{number}: expected 'id<TAB>text' (or a JSON object), got {line[:80]!r}")
            key, text = fields[0], fields[1]
            if with_title and len(fields) > 2 and fields[2]:
                text = f"{fields[2]} {text}"
            if number == 1 and key.lower() in ("_id", "id", "qid", "query-id", "docid", "corpus-id", "pid"):
                continue  # a header line
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: {kind} {key!r} has an empty text")
        if key in texts:
            raise ValueError(f"{path}:{number}: {kind} id {key!r} appears twice")
        texts[key] = text.strip()
    if not texts:
        raise ValueError(f"{path}: no {kind} found")
    return texts


def read_queries(path) -> dict:
    return _read_texts(path, "query", with_title=False)


def read_corpus(path) -> dict:
    return _read_texts(path, "document", with_title=True)


def read_qrels(path) -> dict:
    """{query id: {document id: relevance}} from BEIR (3 columns) or TREC (4 columns) qrels."""
    qrels: dict = {}
    for number, line in _lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) == 4:  # TREC: qid iteration docid relevance
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 3 columns (query-id corpus-id score) or 4 (TREC: qid 0 "
                             f"docid relevance), got {len(fields)}: {line[:80]!r}")
        qid, did, score = (f.strip() for f in fields)
        try:
            relevance = int(float(score))
        except ValueError:
            if number == 1:
                continue  # a header line such as "query-id corpus-id score"
            raise ValueError(f"{path}:{number}: the score {score!r} is not a number") from None
        qrels.setdefault(qid, {})[did] = relevance
    if not qrels:
        raise ValueError(f"{path}: no judgments found")
    return qrels

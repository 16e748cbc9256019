"""Reading evaluation files: queries, corpus and qrels, in BEIR's formats and TREC's.

    queries   .jsonl: {"_id": "q1", "text": "..."} per line      .tsv: q1<TAB>text
    corpus    .jsonl: {"_id": "d1", "title": "...", "text": "..."} .tsv: d1<TAB>text[<TAB>title]
    qrels     BEIR: query-id<TAB>corpus-id<TAB>score (a header line is recognised and skipped)
              TREC: qid 0 docid relevance (4 columns; tabs or spaces)

Every error names the file and the line.
"""
from __future__ import annotations

import json
import os


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


def read_beir_folder(folder: str, split: str = "test") -> tuple[dict, dict, dict]:
    """(corpus, queries, qrels) of a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; the queries kept
    are those the qrels judge."""
    paths = {name: os.path.join(folder, name) for name in ("corpus.jsonl", "queries.jsonl")}
    paths["qrels"] = os.path.join(folder, "qrels", f"{split}.tsv")
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{folder} is not a BEIR folder: {', '.join(missing)} missing")
    qrels = read_qrels(paths["qrels"])
    queries = {qid: text for qid, text in read_queries(paths["queries.jsonl"]).items() if qid in qrels}
    return read_corpus(paths["corpus.jsonl"]), queries, qrels


# -- training data files ----------------------------------------------------------------
TRAIN_SUFFIXES = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "tsv": "csv"}
POSITIONAL = ("query", "positive")  # a header-less table's first columns; then negative_1, negative_2, ...


def _check_utf8(path: str) -> None:
    """A text file that is not UTF-8 named with its line, before a loader fails without one."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {line[err.start]:#x} at column {err.start + 1}). "
                                 "Fix: re-encode the file, e.g. iconv -f latin1 -t utf-8") from None


def _header_less(path: str, delimiter: str) -> int | None:
    """The number of columns of a table whose first line is data, not a header (MS MARCO's triples.train.small.tsv):
    none of its cells names a column this library reads. None when the first line is a header."""
    from .columns import NEGATIVE_LIST_COLUMNS, POSITIVE_COLUMNS, QUERY_COLUMNS

    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n").split(delimiter)
    known = set(QUERY_COLUMNS) | set(POSITIVE_COLUMNS) | set(NEGATIVE_LIST_COLUMNS) | {"negative"}
    if any(cell.strip() in known or cell.strip().startswith(("negative_", "positive_id")) for cell in first):
        return None
    return len(first)


def load_training_file(path: str):
    """A training file as a datasets.Dataset: .jsonl/.json, .parquet, .csv or .tsv. A table without a header is
    read by position (query, positive, negative_1, ...), as MS MARCO ships its triples; cells such as NA or null
    stay text."""
    from datasets import load_dataset

    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix not in TRAIN_SUFFIXES:
        raise ValueError(f"{path}: unknown training file type .{suffix}; use .jsonl, .json, .parquet, .csv or .tsv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such training file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: give it at least one (query, positive) row")
    options = {}
    if suffix in ("csv", "tsv", "jsonl", "json"):
        _check_utf8(path)
        with open(path, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise ValueError(f"{path} holds only blank lines: give it at least one (query, positive) row")
    if suffix in ("csv", "tsv"):
        delimiter = "\t" if suffix == "tsv" else ","
        options = {"delimiter": delimiter, "keep_default_na": False, "na_values": [""]}  # "NA", "null": text
        width = _header_less(path, delimiter)
        if width is not None:
            names = list(POSITIONAL[:width]) + [f"negative_{i}" for i in range(1, width - 1)]
            options.update(column_names=names, header=None)
        if suffix == "tsv":
            options["quoting"] = 3  # csv.QUOTE_NONE: a quote inside a passage is text
    dataset = load_dataset(TRAIN_SUFFIXES[suffix], data_files=path, split="train", **options)
    if len(dataset) == 0:
        raise ValueError(f"{path} has no rows: give it at least one (query, positive) row")
    return dataset

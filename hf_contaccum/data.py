"""Turning `datasets` rows into tokenised dual-encoder batches.

Accepted columns (first match wins):
  query:     query | anchor | question
  positive:  positive | pos | passage | document
  negatives: negative, negative_1, negative_2, ... (one text each; sentence-transformers'
             convention) or one list column: negatives | hard_negatives
  ids:       positive_id, negative_id, negative_1_id, ... (optional). Two passages with
             the same id (or, without ids, the same text) are the same passage: it is
             never used as a negative of a query it is relevant to.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import torch

QUERY_COLUMNS = ("query", "anchor", "question")
POSITIVE_COLUMNS = ("positive", "pos", "passage", "document")
NEGATIVE_LIST_COLUMNS = ("negatives", "hard_negatives")
_NEGATIVE = re.compile(r"^negative(_\d+)?$")


def text_key(value) -> int:
    """A stable 63-bit id of a text or id value (Python's hash() differs per process)."""
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def text_fix(column: str) -> str:
    """The fix for a missing, empty or non-text value in `column`."""
    return (f"remove or repair these rows first, e.g. dataset.filter(lambda r: isinstance(r[{column!r}], str) "
            f"and r[{column!r}].strip())")


class BadRow(ValueError):
    """A row that cannot be trained on: which column, what is wrong, and the fix."""

    def __init__(self, where: str, column: str, problem: str, fix: str):
        super().__init__(f"{where}, column {column!r}: {problem}. Fix: {fix}")
        self.column, self.problem, self.fix = column, problem, fix


@dataclass(frozen=True)
class ColumnMap:
    query: str
    positive: str
    negatives: tuple  # single-text negative columns, in order
    negative_list: str | None

    @classmethod
    def from_columns(cls, columns, name: str = "training data") -> ColumnMap:
        columns = list(columns)
        query = next((c for c in QUERY_COLUMNS if c in columns), None)
        positive = next((c for c in POSITIVE_COLUMNS if c in columns), None)
        missing = [role for role, found in (("query", query), ("positive", positive)) if found is None]
        if missing:
            raise ValueError(
                f"{name} has columns {columns} but no {' and no '.join(missing)} column: name the query "
                f"column one of {QUERY_COLUMNS} and the positive passage column one of {POSITIVE_COLUMNS} "
                "(e.g. dataset.rename_column('question_text', 'query')); hard negatives go in 'negative', "
                "'negative_1', ... or a list column 'negatives'"
            )
        negatives = tuple(sorted((c for c in columns if _NEGATIVE.match(c)), key=lambda c: (len(c), c)))
        negative_list = next((c for c in NEGATIVE_LIST_COLUMNS if c in columns), None)
        if negatives and negative_list:
            raise ValueError(f"{name}: hard negatives given twice, in {negatives} and in the list column "
                             f"{negative_list!r}; keep one")
        return cls(query, positive, negatives, negative_list)

    @property
    def negative_columns(self) -> tuple:
        return (self.negative_list,) if self.negative_list else self.negatives

    def texts(self, row: dict, index, max_hard_negatives: int | None = None):
        """(query, positive, [negatives], positive_key, [negative_keys]) of one row, validated.

        A missing hard negative (None in a negative_N column) is not there: the row has fewer;
        max_hard_negatives keeps the first ones."""
        where = index if isinstance(index, str) else f"row {index}"
        if self.negative_list:
            negs = [(self.negative_list, v, None) for v in (row[self.negative_list] or [])]
        else:
            negs = [(c, row[c], row.get(f"{c}_id")) for c in self.negatives if row.get(c) is not None]
        negs = negs[:max_hard_negatives] if max_hard_negatives is not None else negs
        for column, value in [(self.query, row[self.query]), (self.positive, row[self.positive])] + [
                (c, v) for c, v, _ in negs]:
            if value is None:
                raise BadRow(where, column, "is missing (null)", text_fix(column))
            if not isinstance(value, str):
                raise BadRow(where, column, f"holds {type(value).__name__} {value!r}, expected text", text_fix(column))
            if not value.strip():
                raise BadRow(where, column, "is empty", text_fix(column))
        pos_key = text_key(row["positive_id"]) if row.get("positive_id") is not None else text_key(row[self.positive])
        neg_keys = [text_key(i) if i is not None else text_key(v) for _, v, i in negs]
        return row[self.query], row[self.positive], [v for _, v, _ in negs], pos_key, neg_keys


TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def used_width(attention_mask: torch.Tensor) -> int:
    """One past the last token column that any row attends to (0 if none): the width that cutting off the
    all-padding columns at the end keeps. One read of the device."""
    if attention_mask.shape[1] == 0:
        return 0
    used = attention_mask.bool().any(0)
    return int((used * torch.arange(1, used.shape[0] + 1, device=used.device)).max())


# The batch layout, written down once: query_{TOKEN_FIELDS} (n rows); passage_{TOKEN_FIELDS}
# (n positives, then the n*H hard negatives row-major, so negative h of query i is row
# n + i*H + h); passage_keys (n,); hard_negative_keys (n, H).
def side_features(batch: dict, side: str) -> dict:
    """The tokenised texts of one side ("query" or "passage"), without the prefix."""
    return {k: batch[f"{side}_{k}"] for k in TOKEN_FIELDS if f"{side}_{k}" in batch}


def split_passages(passages, hard_negative_keys):
    """Passage embeddings in batch layout -> positives (n, d) and hard negatives (n, H, d) or None."""
    n, h = hard_negative_keys.shape
    return passages[:n], (passages[n:].view(n, h, -1) if h else None)


class ContrastiveCollator:
    """Tokenises (query, positive, hard negatives) rows on the fly, into the batch layout above.

    Every row of a batch must have the same number of hard negatives (after max_hard_negatives);
    training data is checked for that up front (validation.check_dataset), and a bank that
    keeps hard negatives holds the number of its first batch to every later one."""

    def __init__(self, tokenizer, query_max_length: int = 64, passage_max_length: int = 256,
                 max_hard_negatives: int | None = None, prompts: dict | None = None,
                 pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of  # fewer distinct shapes: fewer torch.compile recompiles
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.max_hard_negatives = max_hard_negatives
        self.prompts = dict(prompts or {})  # {"query": ..., "passage": ...}, the model's (BiEncoderConfig.prompts)
        self._columns = None

    def _texts(self, parsed):
        """Queries and passages (each row's positive, then its hard negatives) with their prompts."""
        q, p = self.prompts.get("query", ""), self.prompts.get("passage", "")
        return [q + r[0] for r in parsed], [[p + t for t in (r[1], *r[2])] for r in parsed]

    def _tokenize(self, texts, max_length, prefix):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                             pad_to_multiple_of=self.pad_to_multiple_of)
        return {f"{prefix}_{k}": v for k, v in enc.items()}

    def __call__(self, rows):
        if not rows:
            raise ValueError("empty batch")
        if "query_input_ids" in rows[0]:
            return self._pad(rows)
        if self._columns is None:
            self._columns = ColumnMap.from_columns(rows[0].keys())
        parsed = [self._columns.texts(r, f"batch row {i}", self.max_hard_negatives) for i, r in enumerate(rows)]
        h = _same_number_of_negatives([len(p[2]) for p in parsed])
        queries, row_passages = self._texts(parsed)
        passages = [r[0] for r in row_passages] + [neg for r in row_passages for neg in r[1:]]
        batch = self._tokenize(queries, self.query_max_length, "query")
        batch.update(self._tokenize(passages, self.passage_max_length, "passage"))
        batch["passage_keys"] = torch.tensor([p[3] for p in parsed], dtype=torch.long)
        batch["hard_negative_keys"] = torch.tensor([p[4] for p in parsed], dtype=torch.long).view(len(rows), h)
        return batch

    # -- tokenising once (ContAccumTrainer does it for a datasets.Dataset) --------------------
    def encode_rows(self, batch: dict) -> dict:
        """A `datasets.map(batched=True)` function: the token ids of every row's texts, unpadded, and their keys."""
        columns = ColumnMap.from_columns(batch.keys())
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        parsed = [columns.texts(r, f"row {i}", self.max_hard_negatives) for i, r in enumerate(rows)]
        query_texts, row_passages = self._texts(parsed)
        queries = self.tokenizer(query_texts, truncation=True, max_length=self.query_max_length)
        passages = self.tokenizer([t for r in row_passages for t in r], truncation=True,
                                  max_length=self.passage_max_length)
        starts = [0]
        for p in parsed:
            starts.append(starts[-1] + 1 + len(p[2]))
        out = {f"query_{k}": list(v) for k, v in queries.items()}
        out.update({f"passage_{k}": [v[a:b] for a, b in itertools.pairwise(starts)] for k, v in passages.items()})
        out["passage_keys"] = [[p[3], *p[4]] for p in parsed]  # the positive's, then the hard negatives'
        return out

    def _pad(self, rows):
        """Rows tokenised by encode_rows -> the same batch as tokenising their texts here."""
        def pad(encodings, prefix):
            padded = self.tokenizer.pad(encodings, padding=True, return_tensors="pt",
                                        pad_to_multiple_of=self.pad_to_multiple_of)
            return {f"{prefix}_{k}": v for k, v in padded.items()}

        fields = [k[len("query_"):] for k in rows[0] if k.startswith("query_")]
        h = _same_number_of_negatives([len(r["passage_keys"]) - 1 for r in rows])
        order = [(i, 0) for i in range(len(rows))] + [(i, j) for i in range(len(rows)) for j in range(1, h + 1)]
        batch = pad([{f: r[f"query_{f}"] for f in fields} for r in rows], "query")
        batch.update(pad([{f: rows[i][f"passage_{f}"][j] for f in fields} for i, j in order], "passage"))
        keys = torch.tensor([r["passage_keys"] for r in rows], dtype=torch.long)
        batch["passage_keys"], batch["hard_negative_keys"] = keys[:, 0].contiguous(), keys[:, 1:].contiguous()
        return batch


def _same_number_of_negatives(counts: list) -> int:
    """H, the hard negatives of every row of a batch (a batch tensor needs one number)."""
    for i, count in enumerate(counts):
        if count != counts[0]:
            raise ValueError(f"batch row {i} has {count} hard negatives, batch row 0 has {counts[0]}: give every row "
                             "the same number or set max_hard_negatives to at most the smallest number")
    return counts[0]


def tokenize_once(dataset, collator: ContrastiveCollator, name: str = "train_dataset"):
    """The dataset's texts tokenised once, up front (datasets.map: batched, cached with file-backed data), so
    that a training step only pads: tokenising stays off the critical path of every micro-batch."""
    return dataset.map(collator.encode_rows, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       desc=f"tokenising {name} once")

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


@dataclass(frozen=True)
class ColumnMap:
    query: str
    positive: str
    negatives: tuple  # single-text negative columns, in order
    negative_list: str | None

    @classmethod
    def from_columns(cls, columns) -> ColumnMap:
        columns = list(columns)
        query = next((c for c in QUERY_COLUMNS if c in columns), None)
        positive = next((c for c in POSITIVE_COLUMNS if c in columns), None)
        missing = [name for name, found in (("query", query), ("positive", positive)) if found is None]
        if missing:
            raise ValueError(
                f"training data has columns {columns} but no {' and no '.join(missing)} column: name the query "
                f"column one of {QUERY_COLUMNS} and the positive passage column one of {POSITIVE_COLUMNS} "
                "(e.g. dataset.rename_column('question', 'query')); hard negatives go in 'negative', "
                "'negative_1', ... or a list column 'negatives'"
            )
        negatives = tuple(sorted((c for c in columns if _NEGATIVE.match(c)), key=lambda c: (len(c), c)))
        negative_list = next((c for c in NEGATIVE_LIST_COLUMNS if c in columns), None)
        if negatives and negative_list:
            raise ValueError(f"hard negatives given twice: in {negatives} and in the list column {negative_list!r}; keep one")
        return cls(query, positive, negatives, negative_list)

    def texts(self, row: dict, index: int):
        """(query, positive, [negatives], positive_key, [negative_keys]) of one row, validated."""
        negs = list(row[self.negative_list]) if self.negative_list else [row[c] for c in self.negatives]
        for name, value in [(self.query, row[self.query]), (self.positive, row[self.positive])] + [
            ("negative", v) for v in negs
        ]:
            if not isinstance(value, str):
                raise ValueError(  # noqa: TRY004 -- one error type for every bad-row problem
                    f"batch row {index}: column {name!r} holds {type(value).__name__} {value!r}, expected a "
                    "string; convert or filter these rows (dataset.filter / dataset.map) before training")
            if not value.strip():
                raise ValueError(f"batch row {index}: column {name!r} is empty; remove empty texts before training "
                                 "(e.g. dataset.filter(lambda r: r['%s'].strip()))" % name)
        pos_key = text_key(row["positive_id"]) if "positive_id" in row else text_key(row[self.positive])
        if self.negative_list:
            neg_keys = [text_key(v) for v in negs]
        else:
            neg_keys = [text_key(row[f"{c}_id"]) if f"{c}_id" in row else text_key(row[c]) for c in self.negatives]
        return row[self.query], row[self.positive], negs, pos_key, neg_keys


TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


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
    """Tokenises (query, positive, hard negatives) rows on the fly, into the batch layout above."""

    def __init__(self, tokenizer, query_max_length: int = 64, passage_max_length: int = 256,
                 max_hard_negatives: int | None = None):
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.max_hard_negatives = max_hard_negatives
        self._columns = None

    def _tokenize(self, texts, max_length, prefix):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {f"{prefix}_{k}": v for k, v in enc.items()}

    def __call__(self, rows):
        if not rows:
            raise ValueError("empty batch")
        if self._columns is None:
            self._columns = ColumnMap.from_columns(rows[0].keys())
        parsed = [self._columns.texts(r, i) for i, r in enumerate(rows)]
        num_negs = {len(p[2]) for p in parsed}
        if len(num_negs) > 1:
            raise ValueError(f"rows of one batch have different numbers of hard negatives {sorted(num_negs)}: "
                             "give every row the same number (pad with mined negatives or truncate)")
        h = num_negs.pop()
        if self.max_hard_negatives is not None:
            h = min(h, self.max_hard_negatives)
        queries = [p[0] for p in parsed]
        passages = [p[1] for p in parsed] + [neg for p in parsed for neg in p[2][:h]]
        batch = self._tokenize(queries, self.query_max_length, "query")
        batch.update(self._tokenize(passages, self.passage_max_length, "passage"))
        batch["passage_keys"] = torch.tensor([p[3] for p in parsed], dtype=torch.long)
        batch["hard_negative_keys"] = torch.tensor([p[4][:h] for p in parsed], dtype=torch.long).view(len(rows), h)
        return batch

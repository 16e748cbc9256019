"""Turning `datasets` rows into tokenised dual-encoder batches (columns: hf_contaccum/data/columns.py)."""
from __future__ import annotations

import itertools

from .columns import ColumnMap
from .keys import passage_keys

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
        ids = [p[3] for p in parsed] + [i for p in parsed for i in p[4]]
        return _with_keys(batch, ids, len(rows), h)

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
        # the positive's id, then the hard negatives' (None: known by its tokens); as text, whatever the ids' type
        out["passage_ids"] = [[None if i is None else str(i) for i in (p[3], *p[4])] for p in parsed]
        return out

    def _pad(self, rows):
        """Rows tokenised by encode_rows -> the same batch as tokenising their texts here."""
        def pad(encodings, prefix):
            padded = self.tokenizer.pad(encodings, padding=True, return_tensors="pt",
                                        pad_to_multiple_of=self.pad_to_multiple_of)
            return {f"{prefix}_{k}": v for k, v in padded.items()}

        fields = [k[len("query_"):] for k in rows[0] if k.startswith("query_")]
        h = _same_number_of_negatives([len(r["passage_ids"]) - 1 for r in rows])
        order = [(i, 0) for i in range(len(rows))] + [(i, j) for i in range(len(rows)) for j in range(1, h + 1)]
        batch = pad([{f: r[f"query_{f}"] for f in fields} for r in rows], "query")
        batch.update(pad([{f: rows[i][f"passage_{f}"][j] for f in fields} for i, j in order], "passage"))
        return _with_keys(batch, [rows[i]["passage_ids"][j] for i, j in order], len(rows), h)


def _with_keys(batch: dict, ids: list, n: int, h: int) -> dict:
    """The batch with passage_keys (n,) and hard_negative_keys (n, H), from the ids in batch-layout order."""
    keys = passage_keys(ids, {k[len("passage_"):]: v for k, v in batch.items() if k.startswith("passage_")})
    batch["passage_keys"], batch["hard_negative_keys"] = keys[:n].contiguous(), keys[n:].view(n, h).contiguous()
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

"""Which column is which: the query, the positive, the hard negatives and their ids.

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

import re
from dataclasses import dataclass

QUERY_COLUMNS = ("query", "anchor", "question")
POSITIVE_COLUMNS = ("positive", "pos", "passage", "document")
NEGATIVE_LIST_COLUMNS = ("negatives", "hard_negatives")
_NEGATIVE = re.compile(r"^negative(_\d+)?$")


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
        """(query, positive, [negatives], positive id, [negative ids]) of one row, validated; an id is None where
        the row gives none (its passage is then known by its tokens, data/keys.py).

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
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadRow(where, column, f"holds invalid Unicode (a lone surrogate at character {err.start})",
                             "repair the text where it was decoded (e.g. open files with encoding='utf-8' and "
                             "errors='replace')") from None
        ids = [row.get("positive_id")] + [i for _, _, i in negs]
        return row[self.query], row[self.positive], [v for _, v, _ in negs], ids[0], ids[1:]

"""Checking training data once, before the first step.

A `datasets.Dataset` is checked column by column with Arrow compute (vectorised: a million
rows take seconds), a list of dicts row by row, an IterableDataset as it streams (with
the global row index). Every problem is reported with the dataset row, the real column
name, how many rows it affects, and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

from .columns import BadRow, ColumnMap, text_fix

BATCH_ROWS = 200_000
MAX_EXAMPLES = 5


@dataclass
class DataCheck:
    num_rows: int | None  # None for a stream
    num_hard_negatives: int | None  # H per row after max_hard_negatives; None: decided by the first streamed row


class _Problems:
    """Rows per (column, problem), reported together in one error."""

    def __init__(self, name):
        self.name = name
        self.rows: dict = {}

    def add(self, column, problem, fix, rows):
        rows = list(rows)
        if rows:
            entry = self.rows.setdefault((column, problem), [fix, 0, []])
            entry[1] += len(rows)
            entry[2].extend(rows[:MAX_EXAMPLES - len(entry[2])])

    def raise_if_any(self):
        if not self.rows:
            return
        lines = [f"{self.name} row {rows[0]}, {_columns_label(column)}: {problem} ({count} row{'s' * (count != 1)} affected"
                 f"{', e.g. rows ' + ', '.join(map(str, rows)) if count > 1 else ''}). Fix: {fix}"
                 for (column, problem), (fix, count, rows) in self.rows.items()]
        raise ValueError("bad training data, found before training started:\n  " + "\n  ".join(lines))


def _columns_label(columns: str) -> str:
    names = columns.split(", ")
    return f"column {names[0]!r}" if len(names) == 1 else "columns " + ", ".join(map(repr, names))


def _hard_negative_problem(problems, counts, wanted, columns):
    """Rows whose number of hard negatives (after max_hard_negatives) differs from row 0's."""
    bad = [i for i, c in enumerate(counts) if c != wanted]
    if bad:
        where = ", ".join(columns)
        problems.add(where, f"has {counts[bad[0]]} hard negatives where row 0 has {wanted}",
                     f"give every row the same number of hard negatives (a missing one is a null in {where}), or set "
                     f"max_hard_negatives to at most {min(counts)} (the smallest number found)", bad)


def check_dataset(dataset, name: str = "train_dataset", max_hard_negatives: int | None = None) -> DataCheck:
    """Check columns, text types, empty or missing texts and hard-negative counts; raise on any problem."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        if dataset.column_names:
            ColumnMap.from_columns(dataset.column_names, name)
        return DataCheck(None, None)
    if isinstance(dataset, datasets.Dataset):
        return _check_arrow(dataset, name, max_hard_negatives)
    return _check_rows(list(dataset), name, max_hard_negatives)


def _check_rows(rows, name, max_hard_negatives):
    if not rows:
        raise ValueError(f"{name} is empty: give it at least one (query, positive) row")
    columns = ColumnMap.from_columns(rows[0].keys(), name)
    problems, counts = _Problems(name), []
    for index, row in enumerate(rows):
        try:
            counts.append(len(columns.texts(row, index, max_hard_negatives)[2]))
        except BadRow as bad:
            problems.add(bad.column, bad.problem, bad.fix, [index])
            counts.append(None)
    problems.raise_if_any()
    _hard_negative_problem(problems, counts, counts[0], columns.negative_columns)
    problems.raise_if_any()
    return DataCheck(len(rows), counts[0])


def checked_stream(dataset, name: str = "train_dataset", max_hard_negatives: int | None = None):
    """An IterableDataset that checks every row as it streams, naming the global row index."""
    columns = None  # read from the first row, once

    def check(row, index):
        nonlocal columns
        if columns is None:
            columns = ColumnMap.from_columns(row.keys(), name)
        try:
            columns.texts(row, index, max_hard_negatives)
        except BadRow as bad:
            raise ValueError(f"{name} {bad}") from None
        return row

    return dataset.map(check, with_indices=True)


def _check_arrow(dataset, name, max_hard_negatives):
    import numpy as np

    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: give it at least one (query, positive) row")
    columns = ColumnMap.from_columns(dataset.column_names, name)
    problems = _Problems(name)
    # Work on the stored table, slice by slice (zero-copy), and bring the per-row results into the
    # dataset's own order at the end: a shuffled or filtered dataset is a table plus an index mapping.
    table = dataset.data
    order = dataset._indices.column(0).to_numpy() if getattr(dataset, "_indices", None) is not None else None
    masks: dict = {}
    counts = []
    for offset in range(0, table.num_rows, BATCH_ROWS):
        part = table.slice(offset, BATCH_ROWS)
        counts.append(_check_columns(part, columns, masks))
    counts = np.concatenate(counts)
    if order is not None:
        counts = counts[order]
    for (column, problem, fix), parts in masks.items():
        mask = np.concatenate(parts)
        rows = np.flatnonzero(mask[order] if order is not None else mask)
        problems.add(column, problem, fix, rows.tolist())
    problems.raise_if_any()
    if max_hard_negatives is not None:
        counts = np.minimum(counts, max_hard_negatives)
    _hard_negative_problem(problems, counts.tolist(), int(counts[0]), columns.negative_columns)
    problems.raise_if_any()
    return DataCheck(len(dataset), int(counts[0]))


def _check_columns(part, columns, masks):
    """Per-row problem masks of one slice (appended to `masks`) and its hard-negative counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def record(column, problem, fix, mask):  # mask: an Arrow boolean array (nulls count as fine) or numpy
        if not isinstance(mask, np.ndarray):
            mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        masks.setdefault((column, problem, fix), []).append(mask)

    def text_values(column, values):
        if pa.types.is_null(values.type):  # every value missing
            values = values.cast(pa.string())
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return values
        record(column, f"holds {values.type} values, expected text",
               "convert the column to strings (dataset.cast_column) or rename it", np.ones(part.num_rows, dtype=bool))
        return None

    h = np.zeros(part.num_rows, dtype=np.int64)
    for column in [columns.query, columns.positive, *columns.negatives]:
        values = text_values(column, part.column(column))
        if values is None:
            continue
        present = pc.is_valid(values)
        if column in columns.negatives:  # a missing hard negative is a null: counted, not an error
            h += np.asarray(present.to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            record(column, "is missing (null)", text_fix(column), pc.invert(present))
        record(column, "is empty", text_fix(column), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    if columns.negative_list:
        lists = part.column(columns.negative_list).combine_chunks()
        h = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = text_values(columns.negative_list, pc.list_flatten(lists))
        if flat is not None:
            bad = pc.fill_null(pc.or_kleene(pc.is_null(flat), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(flat)),
                                                                         0)), True)
            rows = np.asarray(pc.filter(pc.list_parent_indices(lists), bad).to_numpy(zero_copy_only=False))
            mask = np.zeros(part.num_rows, dtype=bool)
            mask[rows] = True
            record(columns.negative_list, "holds an empty or missing hard negative", text_fix(columns.negative_list),
                   mask)
    return h

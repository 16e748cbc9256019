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
    """An IterableDataset that checks every row as it streams. Its row numbers count from the start of the stream;
    read by several DataLoader workers, each numbers the rows of its own shards (a stream's shards have no known
    sizes), and the error says which worker and shards, and quotes the row."""
    columns = None  # read from the first row, once

    def check(row, index):
        nonlocal columns
        if columns is None:
            columns = ColumnMap.from_columns(row.keys(), name)
        try:
            columns.texts(row, _stream_row(index), max_hard_negatives)
        except BadRow as bad:
            raise ValueError(f"{name} {bad} (the row: {_quote(row)})") from None
        return row

    return dataset.map(check, with_indices=True)


def _stream_row(index: int) -> str:
    from torch.utils.data import get_worker_info

    worker = get_worker_info()
    if worker is None or worker.num_workers == 1:
        return f"row {index}"
    return (f"row {index} of DataLoader worker {worker.id} of {worker.num_workers} (its shards: {worker.id}, "
            f"{worker.id} + {worker.num_workers}, ...; with dataloader_num_workers=0 rows count from the stream's "
            "start)")


def _quote(row: dict) -> str:
    return ", ".join(f"{key}={str(value)[:40]!r}" for key, value in list(row.items())[:3])


def _check_arrow(dataset, name, max_hard_negatives):
    import numpy as np

    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: give it at least one (query, positive) row")
    columns = ColumnMap.from_columns(dataset.column_names, name)
    problems = _Problems(name)
    masks: dict = {}
    # the dataset's rows in its own order (a shuffled or filtered one too), as Arrow tables of BATCH_ROWS rows
    counts = [_check_columns(part, columns, masks) for part in dataset.with_format("arrow").iter(BATCH_ROWS)]
    counts = np.concatenate(counts)
    for (column, problem, fix), parts in masks.items():
        problems.add(column, problem, fix, np.flatnonzero(np.concatenate(parts)).tolist())
    problems.raise_if_any()
    if max_hard_negatives is not None:
        counts = np.minimum(counts, max_hard_negatives)
    _hard_negative_problem(problems, counts.tolist(), int(counts[0]), columns.negative_columns)
    problems.raise_if_any()
    return DataCheck(len(dataset), int(counts[0]))


def _text_values(values, record, column, rows):
    """`values` as an Arrow string array, recording the rows that hold something else; None when no row is text."""
    import json

    import numpy as np
    import pyarrow as pa

    if pa.types.is_null(values.type):  # every value missing
        return values.cast(pa.string())
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values
    if isinstance(values.type, pa.BaseExtensionType) and pa.types.is_string(values.type.storage_type):
        # datasets' Json: a column of mixed types (text in most rows, a number in a few), stored as JSON text
        decoded = [None if v is None else json.loads(v) for v in values.storage.to_pylist()]
        bad = np.array([v is not None and not isinstance(v, str) for v in decoded])
        example = next((v for v in decoded if v is not None and not isinstance(v, str)), None)
        record(column, f"holds {type(example).__name__} {example!r} where text is expected", NOT_TEXT_FIX, bad)
        return pa.array([v if isinstance(v, str) else None for v in decoded], pa.string())
    record(column, f"holds {values.type} values, expected text", NOT_TEXT_FIX, np.ones(rows, dtype=bool))
    return None


NOT_TEXT_FIX = ("make the column text: in a .csv/.tsv/.jsonl file quote its values (\"5\" rather than 5), in Python "
                "dataset.cast_column(name, datasets.Value('string'))")


def _check_columns(part, columns, masks):
    """Per-row problem masks of one slice (appended to `masks`) and its hard-negative counts."""
    import numpy as np
    import pyarrow.compute as pc

    def record(column, problem, fix, mask):  # mask: an Arrow boolean array (nulls count as fine) or numpy
        if not isinstance(mask, np.ndarray):
            mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        masks.setdefault((column, problem, fix), []).append(mask)

    h = np.zeros(part.num_rows, dtype=np.int64)
    for column in [columns.query, columns.positive, *columns.negatives]:
        values = _text_values(part.column(column).combine_chunks(), record, column, part.num_rows)
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
        flat = _text_values(pc.list_flatten(lists), lambda *a: None, columns.negative_list, 0)
        if flat is not None:
            bad = pc.fill_null(pc.or_kleene(pc.is_null(flat), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(flat)),
                                                                         0)), True)
            rows = np.asarray(pc.filter(pc.list_parent_indices(lists), bad).to_numpy(zero_copy_only=False))
            mask = np.zeros(part.num_rows, dtype=bool)
            mask[rows] = True
            record(columns.negative_list, "holds an empty or missing hard negative", text_fix(columns.negative_list),
                   mask)
    return h


def check_text_columns(dataset, name: str, skip=("label", "score", "dataset_name")) -> None:
    """Every column but `skip` holds text in every row, none empty (sentence-transformers' columns: anchor, positive,
    negatives, by position). Raises ValueError naming the row, the column and the fix."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_text_columns(part, f"{name}[{key!r}]", skip)
        return
    if not isinstance(dataset, datasets.Dataset):
        return  # a stream: checked where the loss meets its rows
    problems, masks = _Problems(name), {}

    def record(column, problem, fix, mask):
        if not isinstance(mask, np.ndarray):
            mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        masks.setdefault((column, problem, fix), []).append(mask)

    texts = [c for c in dataset.column_names if c not in skip]
    for part in dataset.with_format("arrow").iter(BATCH_ROWS):
        for column in texts:
            values = _text_values(part.column(column).combine_chunks(), record, column, part.num_rows)
            if values is not None:
                record(column, "is missing (null)", text_fix(column), pc.is_null(values))
                record(column, "is empty", text_fix(column),
                       pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    for (column, problem, fix), parts in masks.items():
        problems.add(column, problem, fix, np.flatnonzero(np.concatenate(parts)).tolist())
    problems.raise_if_any()

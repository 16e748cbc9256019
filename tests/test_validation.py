"""Training data is checked once, before the first step: row, column, count and fix in every message."""
import json
import logging

import pytest
import torch
from helpers.data import toy_rows
from helpers.models import tiny_model
from helpers.trainers import trainer_args

from hf_contaccum import ContAccumTrainer
from hf_contaccum.core.bank import MemoryBank
from hf_contaccum.data.validation import check_dataset


def _jsonl_dataset(tmp_path, rows):
    from datasets import load_dataset

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset("json", data_files=str(path), split="train")


def test_mixed_numbers_of_hard_negatives_name_rows_and_columns(tmp_path, tokenizer):
    rows = toy_rows(30, num_negatives=3)
    for i in (7, 19):
        del rows[i]["negative_2"]  # a jsonl where some rows lack the last negative
    ds = _jsonl_dataset(tmp_path, rows)
    with pytest.raises(ValueError, match=r"train_dataset row 7, columns 'negative', 'negative_1', 'negative_2': has 2 "
                                         r"hard negatives where row 0 has 3 \(2 rows affected, e.g. rows 7, 19\).*"
                                         r"max_hard_negatives to at most 2"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path), train_dataset=ds, processing_class=tokenizer)
    # cut to a common number: it trains, the bank keeps 2 per entry
    args = trainer_args(tmp_path, max_hard_negatives=2, memory_bank_size=8, bank_hard_negatives=True, max_steps=2)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    assert trainer.memory_bank.hard_negatives.shape[1] == 2


def test_list_column_and_types(tmp_path):
    from datasets import Dataset

    rows = [{"query": f"q {i}", "positive": f"p {i}", "negatives": [f"n {i}", f"m {i}"]} for i in range(10)]
    rows[4]["negatives"] = ["n 4", " "]
    with pytest.raises(ValueError, match=r"row 4, column 'negatives': holds an empty or missing hard negative"):
        check_dataset(Dataset.from_list(rows))
    numbers = Dataset.from_dict({"query": ["a", "b"], "positive": [1, 2]})
    with pytest.raises(ValueError, match=r"row 0, column 'positive': holds int64 values, expected text"):
        check_dataset(numbers)
    with pytest.raises(ValueError, match="no query and no positive column.*rename_column"):
        check_dataset(Dataset.from_dict({"question_text": ["a"], "answer": ["b"]}))


def test_row_indices_across_batches_and_list_input(monkeypatch):
    from datasets import Dataset

    from hf_contaccum.data import validation

    monkeypatch.setattr(validation, "BATCH_ROWS", 7)  # several Arrow batches
    rows = toy_rows(40)
    rows[23]["query"] = ""
    with pytest.raises(ValueError, match=r"train_dataset row 23, column 'query': is empty \(1 row affected\)"):
        check_dataset(Dataset.from_list(rows))
    shuffled = Dataset.from_list(rows).shuffle(seed=0)  # rows are counted in the dataset's own order
    with pytest.raises(ValueError, match=f"train_dataset row {shuffled['query'].index('')}, column 'query'"):
        check_dataset(shuffled)
    with pytest.raises(ValueError, match=r"train_dataset row 23, column 'query': is empty"):
        check_dataset(rows)  # a list of dicts
    assert check_dataset(Dataset.from_list(toy_rows(40, num_negatives=2))).num_hard_negatives == 2


def test_empty_and_small_datasets(tmp_path, tokenizer, caplog):
    from datasets import Dataset

    empty = Dataset.from_dict({"query": [], "positive": []})
    with pytest.raises(ValueError, match="train_dataset is empty"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path), train_dataset=empty,
                         processing_class=tokenizer)
    with caplog.at_level(logging.WARNING, logger="hf_contaccum.trainer"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, memory_bank_size=16),
                         train_dataset=Dataset.from_list(toy_rows(6)), processing_class=tokenizer)
    assert "fewer than one optimizer step takes (8 pairs" in caplog.text
    assert "memory_bank_size 16 is larger than train_dataset (6 rows)" in caplog.text


def test_streamed_rows_are_checked_with_their_global_index(tmp_path, tokenizer):
    from datasets import Dataset

    rows = toy_rows(40)
    rows[13]["positive"] = ""
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, max_steps=3), train_dataset=stream,
                               processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"train_dataset row 13, column 'positive': is empty"):
        trainer.train()


@pytest.mark.parametrize("first, second", [(0, 1), (1, 0)])
def test_banked_hard_negatives_fixed_by_the_first_batch_in_both_orders(first, second):
    bank = MemoryBank(8, keep_hard_negatives=True)

    def push(h):
        hn = torch.randn(2, h, 4) if h else None
        bank.enqueue(torch.randn(2, 4), torch.randn(2, 4), torch.arange(2), hn,
                     torch.zeros(2, h, dtype=torch.long) if h else None)

    push(first)
    with pytest.raises(ValueError, match=f"keeps {first} hard negatives per entry .* this batch has {second}"):
        push(second)

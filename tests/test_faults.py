"""Faults and bad input, injected: no non-finite checkpoint, torn checkpoints survived, bank files that do not
belong refused, bad rows named where they are, settings checked before training, the CLI's exit status."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers.data import toy_rows
from helpers.launch import run_resume_worker, worker_env
from helpers.models import make_tokenizer, tiny_bert_config, tiny_model
from helpers.trainers import trainer_args

from hf_contaccum import ContAccumLoss, ContAccumTrainer, NoNegativesError
from hf_contaccum.core.checkpoint import BankFileError, bank_file

SAVE_EVERY_2 = {"memory_bank_size": 8, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}


def _trainer(out, tokenizer, data, seed=0, **overrides):
    return ContAccumTrainer(model=tiny_model(seed=seed), args=trainer_args(out, **{**SAVE_EVERY_2, **overrides}),
                            train_dataset=data, processing_class=tokenizer)


# -- no non-finite update, ever -------------------------------------------------------------
def test_a_non_finite_gradient_at_a_save_step_is_never_applied_nor_saved(tmp_path, tokenizer, toy_dataset):
    """A NaN gradient with a finite loss, at a step that would be saved: stopped before the optimizer, no checkpoint
    of it, and the error names the last good checkpoint, which holds finite weights."""
    trainer = _trainer(tmp_path, tokenizer, toy_dataset(32), max_steps=6)
    weight = trainer.model.query_encoder.embeddings.word_embeddings.weight
    weight.register_hook(lambda grad: grad * float("nan") if trainer.state.global_step == 3 else grad)
    with pytest.raises(FloatingPointError, match=r"gradient of query_encoder\.embeddings\.word_embeddings\.weight is "
                                                 r"non-finite with a finite loss.*last good checkpoint is .*checkpoint-2"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-2"] and trainer.state.global_step == 3
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# -- checkpoints that survive a kill ------------------------------------------------------------
@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_resumes_from_the_one_before_exactly(tmp_path):
    full = run_resume_worker(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    torn = run_resume_worker(tmp_path / "torn", kill_at=-6)  # killed while checkpoint-6's last file is written
    assert torn.returncode == -signal.SIGKILL
    folder = tmp_path / "torn" / "out" / "checkpoint-6"
    assert (folder / "model.safetensors").exists() and (folder / "contaccum_bank_rank0.pt").exists()
    with pytest.raises(ValueError, match=r"checkpoint-6 is a torn checkpoint: .*trainer_state\.json is missing"):
        from hf_contaccum.integrations.lifecycle import resolve_resume
        resolve_resume(str(tmp_path / "torn" / "out"), str(folder))
    resumed = run_resume_worker(tmp_path / "torn", resume="True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping torn checkpoint(s) checkpoint-6" in resumed.stderr and "checkpoint-4" in resumed.stderr
    a, b = torch.load(tmp_path / "full" / "result.pt"), torch.load(tmp_path / "torn" / "result.pt")
    assert all(torch.equal(value, b["params"][name]) for name, value in a["params"].items())
    assert {s: v for s, v in a["losses"].items() if s > 4} == {s: v for s, v in b["losses"].items() if s > 4}
    assert all(torch.equal(v, b["bank"][k]) if isinstance(v, torch.Tensor) else v == b["bank"][k]
               for k, v in a["bank"].items())


# -- a bank file that knows what it belongs to ------------------------------------------------------
@pytest.fixture
def two_runs(tmp_path, tokenizer, toy_dataset):
    """Run A (checkpoints 2 and 4) and run B (another seed, checkpoint 4)."""
    data = toy_dataset(32)
    for name, seed in (("a", 0), ("b", 5)):
        _trainer(tmp_path / name, tokenizer, data, seed=seed).train()
    return tmp_path, data


def _resume_with(tmp_path, tokenizer, data, damage, **overrides):
    """A copy of run A's checkpoint-4, its bank file damaged by `damage(path)`, resumed."""
    folder = tmp_path / "copy" / "checkpoint-4"
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-4", folder, dirs_exist_ok=True)
    damage(bank_file(str(folder)))
    trainer = _trainer(tmp_path / "resumed", tokenizer, data, seed=3, max_steps=6, **overrides)
    trainer.train(resume_from_checkpoint=str(folder))


def _overwrite_inside_a_tensor(path):
    state = torch.load(path, weights_only=True)["state"]
    raw = state["_extra_state"]["bank"]["queries"].numpy().tobytes()
    with open(path, "rb") as f:
        content = bytearray(f.read())
    start = content.index(raw[:32]) + 8
    content[start:start + 64] = b"\xff" * 64  # values become NaN / 3.4e38 without touching the zip's structure
    with open(path, "wb") as f:
        f.write(bytes(content))


def _from(run, checkpoint):
    """Replace the bank file with run `run`'s of `checkpoint` (tmp_path/<run>/out/<checkpoint>/)."""
    def copy(path):
        root = pathlib.Path(path).parents[2]
        shutil.copy(root / run / "out" / checkpoint / pathlib.Path(path).name, path)
    return copy


DAMAGES = {
    "corrupted": (_overwrite_inside_a_tensor, r"is corrupted: its tensors do not match the checksum"),
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2), r"cannot be read as a memory bank file"),
    "empty": (lambda p: open(p, "w").close(), r"is empty \(0 bytes\)"),
    "another step's": (_from("a", "checkpoint-2"), r"saved at step 2, but training resumes at step 4"),
    "another run's": (_from("b", "checkpoint-4"), r"saved with other weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_bank_file_that_does_not_belong_is_refused(two_runs, tokenizer, damage):
    tmp_path, data = two_runs
    act, message = DAMAGES[damage]
    with pytest.raises(BankFileError, match=message):
        _resume_with(tmp_path, tokenizer, data, act)


@pytest.mark.parametrize("setting, value", [("similarity", "cos"), ("temperature", 0.5),
                                            ("bank_hard_negatives", True), ("mask_false_negatives", False)])
def test_resuming_with_another_setting_names_it(two_runs, tokenizer, setting, value):
    tmp_path, data = two_runs
    with pytest.raises(BankFileError, match=f"made with {setting}=.*resume with the same {setting}"):
        _resume_with(tmp_path, tokenizer, data, lambda p: None, **{setting: value})


def test_a_bank_of_another_width_is_refused(tmp_path):
    from hf_contaccum.core.checkpoint import load_bank, save_bank

    wide = ContAccumLoss(8)
    wide.enqueue(torch.randn(8, 32), torch.randn(8, 32), torch.arange(8))
    save_bank(wide, str(tmp_path), step=3)
    narrow = ContAccumLoss(8)
    narrow.enqueue(torch.randn(8, 16), torch.randn(8, 16), torch.arange(8))
    with pytest.raises(BankFileError, match="vectors of width 32, this model's are 16"):
        load_bank(narrow, str(tmp_path), step=3)
    fresh = ContAccumLoss(8)
    load_bank(fresh, str(tmp_path), step=3)  # restored: its first micro-batch of another width is refused clearly
    with pytest.raises(ValueError, match="vectors of width 16 for a memory bank of width 32"):
        fresh(torch.randn(4, 16, requires_grad=True), torch.randn(4, 16))


# -- bad rows, found where they are ---------------------------------------------------------------
def _train_on(tmp_path, tokenizer, data, **overrides):
    ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, max_steps=1, **overrides), train_dataset=data,
                     processing_class=tokenizer)


def test_a_number_in_one_jsonl_row_is_reported_at_that_row(tmp_path, tokenizer):
    from hf_contaccum.data.files import load_training_file

    rows = toy_rows(16)
    rows[4]["query"] = 5
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 4, column 'query': holds int 5 where text is expected \(1 row "
                                         r"affected\)\. Fix: .*quote its values"):
        _train_on(tmp_path, tokenizer, load_training_file(str(path)))


def test_invalid_text_is_named_with_its_row_and_line(tmp_path, tokenizer):
    from hf_contaccum.data.files import load_training_file

    rows = toy_rows(8)
    rows[3]["positive"] = "broken \ud800 text"
    with pytest.raises(ValueError, match=r"row 3, column 'positive': holds invalid Unicode"):
        _train_on(tmp_path, tokenizer, rows)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"query": "ok", "positive": "fine"}\n{"query": "caf\xe9", "positive": "x"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8 \(byte 0xe9 at column 15\)"):
        load_training_file(str(latin))
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"{name} (is empty|holds only blank lines)"):
            load_training_file(str(tmp_path / name))


def test_tables_without_a_header_are_read_by_position_and_na_stays_text(tmp_path):
    from hf_contaccum.data.files import load_training_file

    tsv = tmp_path / "triples.train.small.tsv"  # MS MARCO's layout: query, positive, negative; no header
    tsv.write_text("what is a cat\ta cat is a small animal\ta dog barks\nhow tall\tvery tall\tshort\n")
    data = load_training_file(str(tsv))
    assert data.column_names == ["query", "positive", "negative_1"] and data[0]["query"] == "what is a cat"
    csv = tmp_path / "train.csv"
    csv.write_text('query,positive\nNA,null\n"a, b",c\n')
    data = load_training_file(str(csv))
    assert data[0] == {"query": "NA", "positive": "null"} and data[1]["query"] == "a, b"


def test_a_stream_read_by_two_workers_names_the_worker_and_quotes_the_row(tmp_path, tokenizer):
    from datasets import IterableDataset

    def rows(shards):  # datasets hands each shard its part of the list
        for shard in shards:
            for i in range(12):
                yield {"query": "" if (shard, i) == (1, 5) else f"q {shard} {i}", "positive": f"p {shard} {i}"}

    stream = IterableDataset.from_generator(rows, gen_kwargs={"shards": [0, 1]})
    trainer = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, max_steps=6, dataloader_num_workers=2),
                               train_dataset=stream, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"row 5 of DataLoader worker 1 of 2 .*column 'query': is empty.*"
                                         r"the row: query='', positive='p 1 5'"):
        trainer.train()


@pytest.mark.parametrize("bad, problem", [(None, r"row 9, column 'anchor': is missing \(null\)"),
                                          ("  ", "row 9, column 'anchor': is empty"),
                                          (7, "row 0, column 'anchor': holds int64 values, expected text")])
def test_sentence_transformers_data_is_checked_before_training(tmp_path, bad, problem):
    from datasets import Dataset
    from helpers.st import save_encoder, st_model
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from hf_contaccum.sentence_transformers import ContAccumMultipleNegativesRankingLoss

    rows = [{"anchor": r["query"], "positive": r["positive"]} for r in toy_rows(16)]
    for i, row in enumerate(rows):  # (Arrow holds one type a column: a number makes the whole column numbers)
        row["anchor"] = i if isinstance(bad, int) else bad if i == 9 else row["anchor"]
    model = st_model(save_encoder(tmp_path))
    args = SentenceTransformerTrainingArguments(str(tmp_path / "out"), max_steps=2, report_to="none", use_cpu=True,
                                                per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=rf"train_dataset {problem}"):  # when the trainer is built
        SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   loss=ContAccumMultipleNegativesRankingLoss(model))


# -- settings checked before training --------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"memory_bank_size": 10**9}, r"memory_bank_size=1000000000 \(vectors of width 16\) needs about .* GiB"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps .* must be >= 1"),
    ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps .* must be >= 1"),
    ({"memory_bank_size": 12.7}, "memory_bank_size must be a whole number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"query_memory_bank_size": 2.5}, "query_memory_bank_size must be a whole number"),
])
def test_settings_that_would_fail_late_are_refused_before_training(tmp_path, tokenizer, toy_dataset, overrides,
                                                                    message):
    with pytest.raises((ValueError, MemoryError), match=message):
        _train_on(tmp_path, tokenizer, toy_dataset(16), **overrides)


def test_duplicate_positives_are_named_as_data_not_collapse(tmp_path, tokenizer):
    rows = [{"query": r["query"], "positive": "the one passage"} for r in toy_rows(48)]
    trainer = ContAccumTrainer(model=tiny_model(), processing_class=tokenizer, train_dataset=rows,
                               args=trainer_args(tmp_path, memory_bank_size=8, max_steps=20, collapse_patience=3))
    with pytest.raises(NoNegativesError, match="every query's candidates were all masked .* most positives are one "
                                               "text"):
        trainer.train()


def test_a_loss_that_climbs_back_warns_then_stops():
    """The degeneration a passage-only bank showed on a held-out task: the loss, as a share of log(candidates),
    climbs from where it had settled and stays up."""
    from hf_contaccum import EmbeddingCollapseError
    from hf_contaccum.core.diagnostics import TrainingDiagnostics

    diagnostics = TrainingDiagnostics()

    def step(ratio):
        diagnostics._window = {"micro_batches": 1, "spread": 0.5, "loss_ratio": ratio, "bank_read": 1}
        diagnostics.check_collapse(patience=5)

    for ratio in [0.4] * 5 + [0.15] * 20:  # learned
        step(ratio)
    for ratio in [0.2, 0.3, 0.4]:
        step(ratio)
    with pytest.raises(EmbeddingCollapseError, match=r"the loss climbed from 0\.\d+ to 0\.\d+ x"):
        for _ in range(40):
            step(0.7)
    assert diagnostics._warned_rise


# -- the command line's exit status ----------------------------------------------------------------
@pytest.mark.slow
def test_contaccum_train_exits_0_and_prints_its_metrics(tmp_path):
    from transformers import BertModel

    model = tmp_path / "tiny"
    BertModel(tiny_bert_config()).save_pretrained(model)
    make_tokenizer(tmp_path).save_pretrained(model)
    rows = toy_rows(16)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.tsv").write_text("".join(f"q{i}\t{r['query']}\n" for i, r in enumerate(rows[:6])))
    (tmp_path / "c.tsv").write_text("".join(f"d{i}\t{r['positive']}\n" for i, r in enumerate(rows)))
    (tmp_path / "qrels.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    base = [sys.executable, "-m", "hf_contaccum.cli.train", "--model_name_or_path", str(model), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--disable_tqdm", "True"]
    files = ["--train_file", str(tmp_path / "train.jsonl"), "--eval_queries_file", str(tmp_path / "q.tsv"),
             "--eval_corpus_file", str(tmp_path / "c.tsv"), "--eval_qrels_file", str(tmp_path / "qrels.tsv"),
             "--eval_k", "10,1,100"]

    def run(args):
        return subprocess.run(base + args, env=worker_env(), capture_output=True, text=True, timeout=300, check=False)

    done = run(files)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("eval_ndcg@")]
    assert table == ["eval_ndcg@1", "eval_ndcg@10", "eval_ndcg@100"]  # cut-offs in numeric order
    assert "PAD/BOS/EOS" not in done.stderr  # no notice a user cannot act on
    assert run(files + ["--memory_bank_size", "lots"]).returncode != 0
    assert run(["--no_such_option", "1"]).returncode == 2
    missing = run(["--train_file", str(tmp_path / "missing.jsonl")])
    assert missing.returncode == 1 and "missing.jsonl: no such training file" in missing.stderr

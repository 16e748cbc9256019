"""A run killed with SIGKILL and resumed from its last checkpoint equals the uninterrupted run;
and the same for two processes."""
import json
import os
import signal

import pytest
import torch
from helpers.launch import DIST_CONFIG as CONFIG
from helpers.launch import launch_dist_worker as _launch
from helpers.launch import run_resume_worker

pytestmark = [pytest.mark.slow, pytest.mark.distributed]



_run = run_resume_worker


def test_sigkill_mid_training_then_resume_continues_exactly(tmp_path):
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(os.listdir(tmp_path / "killed" / "out"))
    assert "checkpoint-4" in checkpoints and "checkpoint-6" not in checkpoints
    last = tmp_path / "killed" / "out" / "checkpoint-4"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 4
    assert (last / "contaccum_bank_rank0.pt").exists()
    resumed = _run(tmp_path / "killed", resume=str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "full" / "result.pt"), torch.load(tmp_path / "killed" / "result.pt")
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name
    assert {s: l for s, l in a["losses"].items() if s > 4} == {s: l for s, l in b["losses"].items() if s > 4}
    for key, value in a["bank"].items():
        assert torch.equal(value, b["bank"][key]) if isinstance(value, torch.Tensor) else value == b["bank"][key], key


def test_two_process_resume_equals_uninterrupted(tmp_path):
    config = dict(CONFIG, args=dict(CONFIG["args"], max_steps=4, save_strategy="steps", save_steps=2))
    full, full_params = _launch(tmp_path / "full", config)
    resume_from = str(tmp_path / "full" / "out" / "checkpoint-2")
    assert sorted(f for f in os.listdir(resume_from) if f.startswith("contaccum_bank")) == [
        "contaccum_bank_rank0.pt", "contaccum_bank_rank1.pt"]  # every rank's bank travels with the checkpoint
    resumed, resumed_params = _launch(tmp_path / "resumed", dict(config, resume=resume_from))
    for name, value in full_params.items():
        assert torch.equal(value, resumed_params[name]), name
    assert full["checksums"] == resumed["checksums"]
    assert full["losses"][2:] == resumed["losses"][-2:]
    # one process resuming the two processes' checkpoint: each bank file says how many processes made it
    from datasets import Dataset
    from helpers.data import toy_rows
    from helpers.models import make_tokenizer, tiny_model
    from helpers.trainers import trainer_args

    from hf_contaccum import ContAccumTrainer
    from hf_contaccum.core.checkpoint import BankFileError

    args = dict(config["args"], per_device_train_batch_size=4, use_cpu=True)
    single = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / "single", **args),
                              train_dataset=Dataset.from_list(toy_rows(CONFIG["rows"], CONFIG["negatives"])),
                              processing_class=make_tokenizer(tmp_path))
    with pytest.raises(BankFileError, match="saved by a run of 2 processes, this run has 1"):
        single.train(resume_from_checkpoint=resume_from)

"""Two CPU processes (gloo) against one process on the global batch (design.md §3)."""
import os
import sys

import pytest
import torch
from helpers.data import toy_rows
from helpers.launch import DIST_CONFIG, launch, launch_dist_worker
from helpers.models import tiny_model
from helpers.trainers import trainer_args

from hf_contaccum import ContAccumTrainer

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CONFIG = DIST_CONFIG
_launch = launch_dist_worker


@pytest.mark.parametrize("gradcache_chunk_size", [None, 1])
def test_two_processes_equal_one_process_on_global_batch(tmp_path, tokenizer, gradcache_chunk_size, small_chunks):
    """Plain and with GradCache (the hybrid: chunks replayed from a backward hook, only the last
    one synchronising DDP's gradients)."""
    from datasets import Dataset

    config = dict(CONFIG, args=dict(CONFIG["args"], gradcache_chunk_size=gradcache_chunk_size))
    result, params = _launch(tmp_path, config)
    small_chunks(CONFIG["bank_chunk_size"])
    # identical global bank on both ranks
    assert result["checksums"][0] == result["checksums"][1]
    # one process, local batch 2 x 2: accelerate hands rank r the r-th of each pair of batches,
    # so the global micro-batch is the same rows in the same (rank) order
    args = dict(config["args"], per_device_train_batch_size=4, use_cpu=True)  # the 2 processes ran on the CPU (gloo)
    single = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / "single", **args),
                              train_dataset=Dataset.from_list(toy_rows(CONFIG["rows"], CONFIG["negatives"])),
                              processing_class=tokenizer)
    single.train()
    losses = [h["loss"] for h in single.state.log_history if "loss" in h]
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for name, value in single.model.state_dict().items():
        if name.endswith("attention.self.key.bias"):
            # Its exact gradient is 0 (the key bias adds the same q.b_k to every logit of a query's attention
            # row, and softmax ignores a shift), so what both runs hold there is Adam's normalisation of float
            # round-off (~1e-7): noise, not a difference between 1 and 2 processes.
            assert value.abs().max() < 1e-5 and params[name].abs().max() < 1e-5, name
            continue
        assert torch.allclose(value, params[name], atol=1e-6), name
    bank = single.memory_bank
    assert result["checksums"][0][3:] == [bank.ptr, bank.fill]
    # the same vectors: their sum nearly cancels (|sum| << sum of |x|), so the tolerance is on the magnitudes
    magnitude = float(bank.queries.double().abs().sum())
    assert result["checksums"][0][0] == pytest.approx(float(bank.queries.double().sum()), abs=1e-6 * magnitude)


def test_two_processes_refreshing_one_global_bank_equal_one_process(tmp_path, tokenizer, small_chunks):
    """bank_refresh_steps with a global bank: each process keeps every pair's tokens (gathered, of unequal
    widths) and encodes its share of the bank, in blocks of 4 rows: a bank of 11 (fill 4, 8, 11) gives shares
    of 6, so the second process's last block (rows 10-11) runs past the end: it encodes rows 9-10 and keeps
    row 10. One process encodes the whole bank in one block."""
    from datasets import Dataset

    args = dict(CONFIG["args"], memory_bank_size=11, bank_hard_negatives=False, bank_refresh_steps=1, max_steps=5,
                optim="sgd", learning_rate=0.5)  # SGD: parameters move by the gradient itself, not Adam's sign of round-off
    result, params = _launch(tmp_path, dict(CONFIG, args=args, refresh_block=4))
    small_chunks(CONFIG["bank_chunk_size"])
    assert result["checksums"][0] == result["checksums"][1]  # refreshed alike on both ranks

    def one_process(name, **overrides):
        trainer = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / name, **dict(
            args, per_device_train_batch_size=4, use_cpu=True, **overrides)), train_dataset=Dataset.from_list(
            toy_rows(CONFIG["rows"], CONFIG["negatives"])), processing_class=tokenizer)
        trainer.train()
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    single, losses = one_process("single")
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for name, value in single.model.state_dict().items():
        assert torch.allclose(value, params[name], atol=1e-6), name
    bank = single.memory_bank
    assert result["checksums"][0][3:] == [bank.ptr, bank.fill] == [7, 11]
    magnitude = float(bank.queries.double().abs().sum())
    assert result["checksums"][0][0] == pytest.approx(float(bank.queries.double().sum()), abs=1e-6 * magnitude)
    # without the refresh the same run differs: the test can tell
    assert one_process("stale", bank_refresh_steps=0)[1] != pytest.approx(result["losses"], rel=1e-5)


def test_two_processes_moving_one_global_bank_by_the_drift_probe_equal_one_process(tmp_path, tokenizer, small_chunks):
    """bank_drift_probe with a global bank: each process encodes its own probe (its first 2 pairs) and the means
    are averaged, so both move the bank alike, as one process with the union of the probes (its first 4 pairs,
    the same rows) does."""
    from datasets import Dataset

    args = dict(CONFIG["args"], bank_hard_negatives=False, bank_drift_probe=2, max_steps=5, optim="sgd",
                learning_rate=0.5, similarity="cos", temperature=0.1)
    result, params = _launch(tmp_path, dict(CONFIG, args=args))
    small_chunks(CONFIG["bank_chunk_size"])
    assert result["checksums"][0] == result["checksums"][1]  # moved alike on both ranks

    def one_process(name, probe):
        trainer = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / name, **dict(
            args, per_device_train_batch_size=4, bank_drift_probe=probe, use_cpu=True)),
            train_dataset=Dataset.from_list(toy_rows(CONFIG["rows"], CONFIG["negatives"])), processing_class=tokenizer)
        trainer.train()
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    single, losses = one_process("single", 4)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for name, value in single.model.state_dict().items():
        assert torch.allclose(value, params[name], atol=1e-6), name
    magnitude = float(single.memory_bank.queries.double().abs().sum())
    assert result["checksums"][0][0] == pytest.approx(float(single.memory_bank.queries.double().sum()),
                                                      abs=1e-6 * magnitude)
    assert one_process("stale", 0)[1] != pytest.approx(result["losses"], rel=1e-5)  # the test can tell
    assert one_process("own probe only", 2)[1] != pytest.approx(result["losses"], rel=1e-5)  # not rank 0's alone


def test_uneven_dataset_is_evened_not_hung(tmp_path):
    """45 rows over 2 ranks x 2 per batch: accelerate evens the last batch (documented); no hang."""
    config = dict(CONFIG, rows=45, args=dict(CONFIG["args"], max_steps=-1, num_train_epochs=1))
    result, _ = _launch(tmp_path, config, timeout=240)
    assert result["steps"] == 6  # ceil(45 / 4) = 12 global micro-batches / K 2
    assert result["checksums"][0] == result["checksums"][1]


CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "accelerate_configs")


def test_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    assert {"single_gpu.yaml", "multi_gpu_ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml",
            "cpu_2proc.yaml"} <= set(files)
    for name in files:
        config = load_config_from_file(os.path.join(CONFIG_DIR, name))
        assert config.num_processes >= 1, name


def test_cpu_recipe_runs_a_real_training_step(tmp_path):
    config = dict(CONFIG, args=dict(CONFIG["args"], max_steps=1))
    result, _ = _launch(tmp_path, config, launcher=os.path.join(CONFIG_DIR, "cpu_2proc.yaml"))
    assert result["steps"] == 1 and result["checksums"][0] == result["checksums"][1]


def test_launch_retries_a_native_crash_once_and_nothing_else(tmp_path):
    """conftest.launch against torchrun's real report: a worker killed by SIGSEGV is launched once more (and
    must then succeed); a worker that raises is not retried."""
    script = tmp_path / "worker.py"
    script.write_text("import os, signal, sys, pathlib\n"
                      "marker = pathlib.Path(sys.argv[1]) / f'ran{os.environ[\"RANK\"]}'\n"
                      "attempt = int(marker.read_text()) + 1 if marker.exists() else 1\n"
                      "marker.write_text(str(attempt))\n"
                      "if sys.argv[2] == 'raise': raise SystemExit('a Python error')\n"
                      "if attempt == 1 and os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGSEGV)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    with pytest.warns(UserWarning, match="SIGSEGV"):
        launch(cmd + ["crash"])
    assert (tmp_path / "ran1").read_text() == "2"
    with pytest.raises(AssertionError, match="a Python error"):
        launch(cmd + ["raise"])
    assert (tmp_path / "ran1").read_text() == "3"  # one more run, no retry

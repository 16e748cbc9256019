"""The shipped accelerate configs for DDP, DeepSpeed ZeRO-2/3 and FSDP2, run on 2 CPU processes (gloo).

Each engine, from the shipped YAML with only the device fields changed (2 processes, fp32,
a free port): trains, equals one process on the global batch, writes both ranks' banks
with the checkpoint, and resumes from that checkpoint to the uninterrupted result.
DeepSpeed and FSDP are forced onto the CPU group in tests/dist_worker.py (accelerate starts
them only from GPUs); everything else is the library's and the engine's own code.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.data import toy_rows
from helpers.launch import launch, worker_env
from helpers.models import tiny_model
from helpers.trainers import trainer_args

from hf_contaccum import BiEncoder, ContAccumTrainer

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = os.path.join(os.path.dirname(__file__), "workers", "dist_worker.py")
CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "accelerate_configs")
ENGINES = {"ddp": ("cpu_2proc.yaml", None), "deepspeed_zero2": ("deepspeed_zero2.yaml", "deepspeed"),
           "deepspeed_zero3": ("deepspeed_zero3.yaml", "deepspeed"), "fsdp2": ("fsdp.yaml", "fsdp")}
ROWS, NEGATIVES = 48, 1
ARGS = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "memory_bank_size": 10,
        "bank_hard_negatives": True, "mask_false_negatives": True, "save_strategy": "steps", "save_steps": 2}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_copy(engine, tmp_path):
    """The shipped config with the device fields set for 2 CPU processes."""
    name, _ = ENGINES[engine]
    with open(os.path.join(CONFIG_DIR, name)) as f:
        config = yaml.safe_load(f)
    config.update(num_processes=2, mixed_precision="no", main_process_port=_free_port(), num_machines=1)
    config.pop("gpu_ids", None)
    path = tmp_path / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _launch(engine, tmp_path, out, init, check=True, **overrides):
    _, forced = ENGINES[engine]
    if forced == "deepspeed":
        pytest.importorskip("deepspeed", reason="pip install deepspeed (the test extra installs it)")
    args = dict(ARGS, use_cpu=forced is None, **overrides.pop("args", {}))
    config = {"rows": ROWS, "negatives": NEGATIVES, "engine": forced, "init": str(init), "args": args, **overrides}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", _cpu_copy(engine, tmp_path),
           WORKER, str(out), json.dumps(config)]
    return launch(cmd, timeout=300, check=check)


GLOO_SUMS = "would sum the gradients of the 2 processes instead of averaging them"  # check_fsdp2_gradient_average


def _train(engine, tmp_path, out, init, **overrides):
    """Launch a training that must succeed; what rank 0 wrote: (result.json, parameters). FSDP2 is skipped where
    this torch's gloo sums when asked to average (2.7, 2.8): the library refuses it, tested below."""
    proc = _launch(engine, tmp_path, out, init, check=False, **overrides)
    if engine == "fsdp2" and GLOO_SUMS in proc.stderr:
        pytest.skip(f"torch {torch.__version__}'s gloo reduce-scatter sums for ReduceOp.AVG (pytorch/pytorch#162338)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text()), torch.load(out / "params.pt")


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    tiny_model().save_pretrained(path)
    return path


def _single_process(tmp_path, init, tokenizer, **overrides):
    from datasets import Dataset

    args = {**ARGS, "per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True, **overrides}
    trainer = ContAccumTrainer(model=BiEncoder.from_pretrained(str(init)), args=trainer_args(tmp_path, **args),
                               train_dataset=Dataset.from_list(toy_rows(ROWS, NEGATIVES)), processing_class=tokenizer)
    trainer.train()
    return trainer


def _assert_same_training(result, params, trainer, atol=1e-6):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for name, value in trainer.model.state_dict().items():
        if name.endswith("attention.self.key.bias"):  # gradient exactly 0: both hold Adam's round-off (see test_distributed)
            assert value.abs().max() < 1e-5 and params[name].abs().max() < 1e-5, name
            continue
        assert torch.allclose(value, params[name].float(), atol=atol), (name, (value - params[name]).abs().max())
    bank = trainer.memory_bank
    assert result["checksums"][0] == result["checksums"][1]  # one global bank on both ranks
    assert result["checksums"][0][3:] == [bank.ptr, bank.fill]
    assert result["checksums"][0][0] == pytest.approx(float(bank.queries.double().sum()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_trains_checkpoints_and_resumes_exactly(engine, tmp_path, init_model, tokenizer):
    out = tmp_path / "run"
    result, params = _train(engine, tmp_path, out, init_model)
    _assert_same_training(result, params, _single_process(tmp_path / "single", init_model, tokenizer))
    checkpoint = out / "out" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"contaccum_bank_rank0.pt", "contaccum_bank_rank1.pt"} <= files, files
    if engine.startswith("deepspeed"):
        assert "global_step2" in files, files  # the engine's own sharded checkpoint
    # resume from step 2 in a fresh launch: the same steps 3-4, parameters and bank as uninterrupted
    resumed_out = tmp_path / "resumed"
    resumed, resumed_params = _train(engine, tmp_path, resumed_out, init_model, resume=str(checkpoint))
    assert resumed["steps"] == 4
    assert resumed["losses"] == pytest.approx(result["losses"], rel=1e-6)  # steps 1-2 come from trainer_state.json
    assert resumed["checksums"] == result["checksums"]
    for name, value in params.items():
        assert torch.equal(value, resumed_params[name]), name


@pytest.mark.parametrize("engine", ["deepspeed_zero2", "fsdp2"])
def test_gradcache_under_sharding_engine_equals_one_process(engine, tmp_path, init_model, tokenizer):
    """DeepSpeed reduces a gradient as it is accumulated and refuses a second one per step; GradCache
    then hands each parameter the sum of its chunks once (gradcache.py)."""
    out = tmp_path / "run"
    result, params = _train(engine, tmp_path, out, init_model, args={"gradcache_chunk_size": 1, "save_strategy": "no"})
    single = _single_process(tmp_path / "single", init_model, tokenizer, gradcache_chunk_size=1)
    _assert_same_training(result, params, single, atol=5e-6)


@pytest.mark.parametrize("engine", ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_sharded_gradients_are_averaged_like_one_process(engine, tmp_path, init_model, tokenizer):
    """One SGD step: each parameter moves by its gradient itself. Adam's update nearly ignores the gradient's scale,
    so the tests above would barely see an engine that sums the processes' gradients instead of averaging them
    (FSDP2 on gloo in torch 2.7 and 2.8 did: exactly 2x this update on 2 processes)."""
    sgd = {"optim": "sgd", "learning_rate": 0.5, "max_steps": 1, "save_strategy": "no"}
    result, params = _train(engine, tmp_path, tmp_path / "run", init_model, args=sgd)
    _assert_same_training(result, params, _single_process(tmp_path / "single", init_model, tokenizer, **sgd))


def test_gradcache_under_zero3_is_refused_before_training(tmp_path, init_model):
    proc = _launch("deepspeed_zero3", tmp_path, tmp_path / "run", init_model, check=False,
                   args={"gradcache_chunk_size": 1, "save_strategy": "no"})
    assert proc.returncode != 0
    assert "does not work under DeepSpeed ZeRO-3" in proc.stderr and "ZeRO-2" in proc.stderr


def test_fsdp2_on_a_group_that_sums_instead_of_averaging_is_refused_before_training(tmp_path, init_model):
    proc = _launch("fsdp2", tmp_path, tmp_path / "run", init_model, check=False, sum_for_avg=True)
    assert proc.returncode != 0
    assert GLOO_SUMS in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "result.json").exists()


def test_two_machines_documented_command(tmp_path, init_model, tokenizer):
    """README's multi-node command, with two launches on this machine standing in for two machines
    (--num_machines 2, one process each, machine 0's address and port): the same training as one process."""
    port, out = str(_free_port()), tmp_path / "run"
    config = json.dumps({"rows": ROWS, "negatives": NEGATIVES, "init": str(init_model),
                         "args": dict(ARGS, save_strategy="no")})
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIG_DIR, "cpu_2proc.yaml"),
         "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "--num_processes", "2", WORKER, str(out), config],
        env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [machine.communicate(timeout=300) for machine in machines]
    for machine, (stdout, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stdout[-3000:] + stderr[-6000:]
    result, params = json.loads((out / "result.json").read_text()), torch.load(out / "params.pt")
    _assert_same_training(result, params, _single_process(tmp_path / "single", init_model, tokenizer))


@pytest.mark.parametrize("gradcache_chunk_size", [None, 1])
def test_lora_towers_two_processes_equal_one_process(tmp_path, tokenizer, gradcache_chunk_size):
    """Separate towers with LoRA adapters under DDP (dropout off: ranks draw other masks than one process;
    GradCache's replay of LoRA dropout is tested in test_adapters_decoders_prompts.py)."""
    import peft

    init = tmp_path / "lora_init"
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                           init_lora_weights=False)
    from helpers.models import tiny_bert_config

    BiEncoder.from_encoder_config(tiny_bert_config(), shared=False, peft_config=lora).save_pretrained(init)
    overrides = {"gradcache_chunk_size": gradcache_chunk_size, "save_strategy": "no"}
    out = tmp_path / "run"
    result, params = _train("ddp", tmp_path, out, init, args=overrides)
    single = _single_process(tmp_path / "single", init, tokenizer, **overrides)
    assert sum(p.requires_grad for p in single.model.parameters()) == 8  # A and B of query and value, two towers
    _assert_same_training(result, params, single)


def test_compiled_two_processes_equal_one_eager_process(tmp_path, init_model, tokenizer):
    """torch_compile=True under DDP (the bank gathered across processes) against eager, one process."""
    out = tmp_path / "run"
    result, params = _train("ddp", tmp_path, out, init_model, args={"torch_compile": True, "save_strategy": "no"})
    _assert_same_training(result, params, _single_process(tmp_path / "single", init_model, tokenizer), atol=1e-5)

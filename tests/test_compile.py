"""torch_compile=True (inductor, on CPU here) trains exactly like eager mode, in every mode.

Dropout is off: compiled code draws its dropout masks differently from eager code (any
torch.compile does), so only a deterministic model can be compared step for step."""
import pytest
import torch
from helpers.data import toy_rows
from helpers.models import tiny_model
from helpers.trainers import DEVICE, assert_trained_alike, trainer_args

from hf_contaccum import ContAccumTrainer, ContrastiveCollator

pytestmark = [pytest.mark.slow]

MODES = {"bank and banked hard negatives": {},
         "hybrid (GradCache chunks + bank)": {"gradcache_chunk_size": 2},
         "padded to a multiple of 16": {"pad_to_multiple_of": 16},
         "one tower call": {"one_tower_call": True},
         "drift probe (an eval-mode call before each step)": {"bank_drift_probe": 2}}


def _train(tmp_path, tokenizer, compiled, **overrides):
    from datasets import Dataset

    args = trainer_args(tmp_path, **{"memory_bank_size": 8, "bank_hard_negatives": True, "max_steps": 3,
                                     "torch_compile": compiled, "use_cpu": True, **overrides})
    trainer = ContAccumTrainer(model=tiny_model(), args=args,
                               train_dataset=Dataset.from_list(toy_rows(40, num_negatives=1)), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_training_equals_eager(tmp_path, tokenizer, mode):
    eager = _train(tmp_path / "eager", tokenizer, False, **MODES[mode])
    compiled = _train(tmp_path / "compiled", tokenizer, True, **MODES[mode])
    assert_trained_alike(eager, compiled, lambda t: t.memory_bank.queries)


def test_pad_to_multiple_of_bounds_shapes_and_changes_nothing_else(tokenizer):
    rows = toy_rows(6, num_negatives=1)
    plain = ContrastiveCollator(tokenizer, 32, 32)(rows)
    padded = ContrastiveCollator(tokenizer, 32, 32, pad_to_multiple_of=16)(rows)
    assert padded["query_input_ids"].shape[1] % 16 == 0 and padded["passage_input_ids"].shape[1] % 16 == 0
    width = plain["query_input_ids"].shape[1]
    assert torch.equal(padded["query_input_ids"][:, :width], plain["query_input_ids"])
    assert not padded["query_attention_mask"][:, width:].any()
    model = tiny_model().eval()
    with torch.no_grad():
        a = model(**{k: v for k, v in plain.items() if "_keys" not in k})
        b = model(**{k: v for k, v in padded.items() if "_keys" not in k})
    assert torch.allclose(a.query_embeddings, b.query_embeddings, atol=1e-5)


@pytest.mark.parametrize("settings", [{"torch_compile_mode": "reduce-overhead", "gradient_accumulation_steps": 2},
                                      {"torch_compile_mode": "max-autotune", "gradient_accumulation_steps": 1,
                                       "per_device_train_batch_size": 8, "gradcache_chunk_size": 2},
                                      {"torch_compile_backend": "cudagraphs", "gradient_accumulation_steps": 2}])
def test_cuda_graphs_with_several_backwards_per_step_are_refused_before_training(tmp_path, settings):
    with pytest.raises(ValueError, match=r"CUDA graphs.*several backward passes.*overwrite.*96693.*the default mode"):
        trainer_args(tmp_path, **settings)
    trainer_args(tmp_path, **{**settings, "torch_compile_mode": "max-autotune-no-cudagraphs",
                              "torch_compile_backend": "inductor"})  # the same without CUDA graphs: allowed


def test_cuda_graphs_from_accelerate_settings_are_refused_too(tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend inductor --dynamo_mode reduce-overhead` (or an accelerate config) compiles
    the model under CUDA graphs with torch_compile left False: accelerate takes what the Trainer leaves unset from
    the environment."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "reduce-overhead")
    with pytest.raises(ValueError, match=r"ACCELERATE_DYNAMO_MODE='reduce-overhead' runs the model under CUDA graphs"):
        trainer_args(tmp_path, gradient_accumulation_steps=2)
    trainer_args(tmp_path, gradient_accumulation_steps=2, torch_compile_mode="default")  # the arguments win


@pytest.mark.gpu
def test_cuda_graphs_with_one_backward_per_step_train_like_eager(tmp_path, tokenizer):
    """Allowed with one backward per step: on a GPU this runs CUDA graphs (fixed shapes by padding); on a CPU
    inductor runs without them, and the test checks the setting trains."""
    settings = {"gradient_accumulation_steps": 1, "per_device_train_batch_size": 8, "max_steps": 4,
                "pad_to_multiple_of": 16, "use_cpu": DEVICE.type == "cpu"}
    eager = _train(tmp_path / "eager", tokenizer, False, **settings)
    graphs = _train(tmp_path / "graphs", tokenizer, True, torch_compile_mode="reduce-overhead", **settings)
    assert graphs.args.torch_compile_mode == "reduce-overhead"
    tolerance = 1e-5 if DEVICE.type == "cpu" else 1e-4  # CUDA: inductor sums in other orders
    assert_trained_alike(eager, graphs, lambda t: t.memory_bank.queries, tolerance)

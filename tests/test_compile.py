"""torch_compile=True (inductor, on CPU here) trains exactly like eager mode, in every mode.

Dropout is off: compiled code draws its dropout masks differently from eager code (any
torch.compile does), so only a deterministic model can be compared step for step."""
import pytest
import torch
from conftest import tiny_model, toy_rows, trainer_args

from hf_contaccum import ContAccumTrainer, ContrastiveCollator

MODES = {"bank and banked hard negatives": {},
         "hybrid (GradCache chunks + bank)": {"gradcache_chunk_size": 2},
         "padded to a multiple of 16": {"pad_to_multiple_of": 16},
         "one tower call": {"one_tower_call": True},
         "drift probe (an eval-mode call before each step)": {"bank_drift_probe": 2}}


def _train(tmp_path, tokenizer, compiled, **overrides):
    from datasets import Dataset

    args = trainer_args(tmp_path, memory_bank_size=8, bank_hard_negatives=True, max_steps=3, torch_compile=compiled,
                        use_cpu=True, **overrides)
    trainer = ContAccumTrainer(model=tiny_model(), args=args,
                               train_dataset=Dataset.from_list(toy_rows(40, num_negatives=1)), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_training_equals_eager(tmp_path, tokenizer, mode):
    eager = _train(tmp_path / "eager", tokenizer, False, **MODES[mode])
    compiled = _train(tmp_path / "compiled", tokenizer, True, **MODES[mode])
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"  # really compiled
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, value in eager.model.state_dict().items():
        assert torch.allclose(value, compiled.model.state_dict()[name], atol=1e-5), name
    assert torch.allclose(eager.memory_bank.queries, compiled.memory_bank.queries, atol=1e-5)


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

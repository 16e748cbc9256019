"""What the trainer tests share: the device they train on, their arguments, and comparisons of finished runs."""
import os

import torch

# Trainer tests run where users train: on the GPU when there is one, on the CPU otherwise
# (CONTACCUM_TEST_DEVICE=cpu forces the CPU). Their references are built on the same device, in fp32
# without TF32, so both sides of every comparison run the same kind of arithmetic. Tests that compare
# with other processes (gloo) or compile with inductor stay on the CPU (use_cpu=True in their own args).
DEVICE = torch.device(os.environ.get("CONTACCUM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def on_device(batch: dict) -> dict:
    """A collated batch moved to the device the Trainer trains on (what its _prepare_inputs does)."""
    return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def trainer_args(tmp_path, **overrides):
    from hf_contaccum import ContAccumTrainingArguments

    defaults = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-3,
                "lr_scheduler_type": "constant", "weight_decay": 0.0, "max_grad_norm": 0.0,
                "train_sampling_strategy": "sequential", "optim": "adamw_torch", "report_to": "none",
                "save_strategy": "no", "logging_steps": 1, "use_cpu": DEVICE.type == "cpu", "seed": 0, "disable_tqdm": True,
                "query_max_length": 16, "passage_max_length": 24,
                "memory_bank_size": 0}  # tests name their bank; the library's default is "auto" (= N_total)
    defaults.update(overrides)
    return ContAccumTrainingArguments(**defaults)


def accelerate_told_the_accumulation_steps(monkeypatch):
    """What transformers 5.0 to 5.5.3 did: the Trainer also handed accelerate gradient_accumulation_steps, whose
    backward then divided every loss by them a second time."""
    from transformers import Trainer

    built = Trainer.create_accelerator_and_postprocess

    def old_trainer(self):
        built(self)
        self.accelerator.gradient_accumulation_steps = self.args.gradient_accumulation_steps

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", old_trainer)


def assert_trained_alike(eager, compiled, bank, tolerance=1e-5):
    """Two finished trainers, one with torch.compile: really compiled, and the same losses, parameters and bank
    (bank(trainer) -> a bank tensor) as eager."""
    import pytest

    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=tolerance)
    for name, value in eager.model.state_dict().items():
        assert torch.allclose(value, compiled.model.state_dict()[name], atol=tolerance), name
    assert torch.allclose(bank(eager), bank(compiled), atol=tolerance)

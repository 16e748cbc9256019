"""Launched by tests/test_resume.py and tests/test_faults.py: train, optionally SIGKILL itself at a step's end or
while writing a checkpoint's last file (a torn checkpoint), or resume ("True": the newest complete checkpoint)."""
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
from helpers.data import toy_rows
from helpers.models import make_tokenizer, tiny_model
from helpers.trainers import trainer_args
from transformers import TrainerCallback


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: a crash


def tear_at(step):
    """SIGKILL while the Trainer writes checkpoint-<step>'s trainer_state.json: everything else of it is written."""
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def save_or_die(self, path):
        if f"checkpoint-{step}" in str(path):
            with open(path, "w") as f:
                f.write("{")  # half a file, then gone
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, path)

    TrainerState.save_to_json = save_or_die


def main(out_dir, kill_at, resume):
    from datasets import Dataset

    from hf_contaccum import ContAccumTrainer

    if kill_at < 0:  # -N: tear checkpoint-N
        tear_at(-kill_at)
    if resume == "True":
        resume = True

    args = trainer_args(Path(out_dir), memory_bank_size=12, bank_hard_negatives=True, gradient_accumulation_steps=2,
                        max_steps=6, save_strategy="steps", save_steps=2, train_sampling_strategy="random",
                        use_cpu=True)
    ds = Dataset.from_list(toy_rows(60, num_negatives=1))
    trainer = ContAccumTrainer(model=tiny_model(seed=1 if resume else 0), args=args, train_dataset=ds,
                               processing_class=make_tokenizer(Path(tempfile.mkdtemp())),
                               callbacks=[KillAt(kill_at)] if kill_at > 0 else None)
    trainer.train(resume_from_checkpoint=resume or None)
    torch.save({"params": trainer.model.state_dict(), "bank": trainer.memory_bank.state_dict(),
                "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}},
               Path(out_dir) / "result.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")

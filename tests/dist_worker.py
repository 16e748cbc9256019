"""Launched by tests/test_distributed.py under torchrun or accelerate launch (2 CPU processes, gloo).

Trains a tiny BiEncoder with ContAccumTrainer and writes, from rank 0, what the test
compares against a single process on the global batch: parameters, logged losses, and
every rank's bank checksum.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tokenizer, tiny_model, toy_rows, trainer_args


def main(out_dir, config):
    from accelerate import PartialState
    from datasets import Dataset

    from hf_contaccum import ContAccumTrainer

    # one output_dir shared by both ranks, as in real use; creating the arguments sets up the process group
    args = trainer_args(Path(out_dir), **config["args"])
    state = PartialState()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    assert torch.distributed.get_world_size() == 2
    tmp = Path(tempfile.mkdtemp())
    tokenizer = make_tokenizer(tmp)
    ds = Dataset.from_list(toy_rows(config["rows"], config["negatives"]))
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=config.get("resume"))
    bank = trainer.memory_bank
    checksum = torch.tensor([float(bank.queries.double().sum()), float(bank.passages.double().sum()),
                             float(bank.passage_keys.sum() % 1000003), bank.ptr, bank.fill])
    checksums = [torch.zeros_like(checksum) for _ in range(2)]
    torch.distributed.all_gather(checksums, checksum)
    if state.is_main_process:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                   Path(out_dir) / "params.pt")
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (Path(out_dir) / "result.json").write_text(json.dumps({
            "losses": [h["loss"] for h in logs], "checksums": [c.tolist() for c in checksums],
            "steps": trainer.state.global_step}))
    state.wait_for_everyone()
    # Leave without interpreter teardown. torch 2.13's gloo group cannot be torn down reliably from
    # Python: left to exit, its worker thread is sometimes destroyed while joinable (SIGABRT,
    # "terminate called without an active exception"); destroyed earlier, its destructor joins that
    # thread holding the GIL while the thread waits for the GIL to free a gathered tensor (deadlock).
    # Both were seen here after the results were written; neither says anything about the library.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))

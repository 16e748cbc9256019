"""Launched by tests/test_distributed.py and tests/test_engines.py under torchrun or accelerate
launch (2 CPU processes, gloo).

Trains a tiny BiEncoder with ContAccumTrainer and writes, from rank 0, what the test
compares against a single process on the global batch: parameters (gathered by the engine),
logged losses, and every rank's bank checksum.

config: rows, negatives, args (ContAccumTrainingArguments overrides), and optionally
refresh_block (the refresh's block size), engine ("deepspeed" or "fsdp": see force_engine_on_cpu), init (a saved BiEncoder folder to
start from; under ZeRO-3 from_pretrained partitions it while loading), resume (a checkpoint), sum_for_avg
(gloo's reduce-scatter sums when asked to average, as in torch 2.7 and 2.8).
"""
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from helpers.data import toy_rows
from helpers.models import make_tokenizer, tiny_model
from helpers.trainers import trainer_args


def force_engine_on_cpu(engine):
    """accelerate only starts DeepSpeed or FSDP from a GPU process group: on CPU (use_cpu=False, no GPU)
    its state has no backend and runs ONE process, and FSDP is only chosen on a multi-GPU state. So this
    test re-creates the state as accelerate's two-process CPU (gloo) group, and for FSDP labels that
    group multi-GPU, the one place accelerate reads ACCELERATE_USE_FSDP. Everything after (the engine's
    wrapping, sharding, optimizer, checkpoints) is the library's and the engine's own code."""
    from accelerate import PartialState
    from accelerate.state import DistributedType

    PartialState._reset_state()
    state = PartialState(cpu=True)
    if engine == "fsdp":
        state._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def sum_for_avg():
    """What gloo's reduce-scatter did with ReduceOp.AVG in torch 2.7 and 2.8 (pytorch/pytorch#162338): it summed."""
    from torch.distributed import ReduceOp

    def summing(original):
        def reduce_scatter(output, input, op=ReduceOp.SUM, **kwargs):
            return original(output, input, op=ReduceOp.SUM if op == ReduceOp.AVG else op, **kwargs)
        return reduce_scatter

    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # torch 2.13 deprecates the first
        if hasattr(torch.distributed, name):
            setattr(torch.distributed, name, summing(getattr(torch.distributed, name)))


def main(out_dir, config):
    from accelerate import PartialState
    from datasets import Dataset

    from hf_contaccum import BiEncoder, ContAccumTrainer
    from hf_contaccum.core.lse_cache import BankLogsumexp

    settings = dict(config["args"])
    BankLogsumexp.chunk_size_override = config.get("bank_chunk_size")  # small chunks: every edge case
    # one output_dir shared by both ranks, as in real use; creating the arguments sets up the process group
    args = trainer_args(Path(out_dir), **{"use_cpu": True, **settings})  # gloo: the CPU, unless the test says
    if config.get("engine"):
        force_engine_on_cpu(config["engine"])
    if config.get("sum_for_avg"):
        sum_for_avg()
    state = PartialState()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    assert torch.distributed.get_world_size() == 2
    tmp = Path(tempfile.mkdtemp())
    tokenizer = make_tokenizer(tmp)
    ds = Dataset.from_list(toy_rows(config["rows"], config["negatives"]))
    model = BiEncoder.from_pretrained(config["init"]) if config.get("init") else tiny_model()
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    if config.get("refresh_block"):  # bank_refresh_steps: encode the bank in blocks of this many rows per process
        staleness = trainer.contrastive_loss.staleness
        staleness.refresh = functools.partial(staleness.refresh, block=config["refresh_block"])
    trainer.train(resume_from_checkpoint=config.get("resume"))
    bank = trainer.memory_bank
    checksum = torch.tensor([float(bank.queries.double().sum()), float(bank.passages.double().sum()),
                             float(bank.passage_keys.sum() % 1000003), bank.ptr, bank.fill])
    checksums = [torch.zeros_like(checksum) for _ in range(2)]
    torch.distributed.all_gather(checksums, checksum)
    full = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathered from the shards (all ranks call it)
    if state.is_main_process:
        # torch_compile=True: the compiled wrapper's parameter names carry _orig_mod.
        torch.save({k.replace("_orig_mod.", ""): v.detach().clone() for k, v in full.items()},
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

"""Launched by tests/test_sentence_transformers.py under torchrun (2 CPU processes, gloo).

Each rank computes hf_contaccum's sentence-transformers loss on its half of every
batch with gather_across_devices=True; gradients are averaged as DDP does. Rank 0 writes the
averaged gradients of each step and every rank's bank checksum, for comparison with one
process on the whole batch.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.data import toy_rows
from helpers.st import features, st_model


def main(out_dir, encoder_dir, config):
    from hf_contaccum.sentence_transformers import ContAccumMultipleNegativesRankingLoss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    model = st_model(encoder_dir)
    model.train()
    loss_fn = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=config["bank"], gather_across_devices=True,
                                                    bank_hard_negatives=True)
    rows, n = toy_rows(config["rows"], num_negatives=1), config["batch"]
    results = []
    for step in range(config["steps"]):
        batch = rows[step * n:(step + 1) * n]
        mine = batch[rank * n // world:(rank + 1) * n // world]
        model.zero_grad()
        loss = loss_fn(features(model, mine, ["query", "positive", "negative"]), None)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[name] = (p.grad / world).clone()
        results.append({"loss": float(loss), "grads": grads})
    bank = loss_fn.memory_bank
    checksum = torch.tensor([float(bank.queries.double().sum()), float(bank.passages.double().sum()),
                             float(bank.hard_negatives.double().sum()), bank.ptr, bank.fill], dtype=torch.float64)
    checksums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    if rank == 0:
        torch.save({"steps": results, "checksums": [c.tolist() for c in checksums]}, Path(out_dir) / "st_dist.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # see dist_worker.py: gloo teardown at interpreter exit is unreliable on CPU


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))

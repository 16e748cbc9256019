"""Does this torch's gloo backend average when asked to? FSDP2 reduce-scatters fp32 gradients with ReduceOp.AVG;
gloo summed instead in torch 2.7 and 2.8 (pytorch/pytorch#162338), so FSDP2 on CPU processes trained on gradients
world-size times too large. hf_contaccum refuses that before training (training_args.check_fsdp2_gradient_average,
with the same average_of_ones); this prints what a torch does, for README "Versions".

    python -m benchmarks.gloo_average >> benchmarks/results/versions/lowest/gloo_average.jsonl
"""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_contaccum.integrations.guards import average_of_ones

WORLD = 2


def worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    average = average_of_ones("cpu")
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "processes": WORLD, "reduce_scatter_avg_of_ones": average,
                          "averages": average == 1.0}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(worker, args=(free_port,), nprocs=WORLD)

"""Does a model loaded under DeepSpeed ZeRO-3 (zero.Init: from_pretrained loads into partitioned parameters) hold the
saved weights? Launched on 2 CPU processes (gloo) with the shipped deepspeed_zero3.yaml, device fields for the CPU:

    python -c "import sys; sys.path.insert(0, 'tests'); from conftest import tiny_model; tiny_model().save_pretrained('/tmp/init')"
    accelerate launch --config_file <deepspeed_zero3.yaml with num_processes 2, mixed_precision no> \
        benchmarks/results/lowest_versions/zero3_load_probe.py /tmp/init [auto] >> zero3_load.jsonl

Loads the BiEncoder (or, with "auto", transformers' AutoModel of its query tower) 4 times, gathers every parameter
and counts those that differ from the saved file (torch.equal). The saved weights are read first: that leaves freed
memory behind, so a parameter the load never wrote shows garbage (seen: 1e24..3e35, NaN) instead of the zeros of
fresh pages. Rank 0 prints one JSON line. Uses tests/dist_worker.py's force_engine_on_cpu.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "tests"))
import torch
from conftest import trainer_args
from dist_worker import force_engine_on_cpu


def main(init, which):
    import tempfile

    trainer_args(Path(tempfile.mkdtemp()), use_cpu=False)  # the Trainer's DeepSpeed config: from_pretrained uses zero.Init
    force_engine_on_cpu("deepspeed")
    import deepspeed
    import transformers
    from safetensors.torch import load_file

    from hf_contaccum import BiEncoder

    saved = load_file(f"{init}/query_encoder/model.safetensors" if which == "auto" else f"{init}/model.safetensors")
    corrupted = []
    for load in range(4):
        model = transformers.AutoModel.from_pretrained(f"{init}/query_encoder") if which == "auto" else \
            BiEncoder.from_pretrained(init)
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, p in params.items():
                if not torch.equal(p, saved[name]):
                    corrupted.append([load, name, (p - saved[name]).abs().max().item()])
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "model": which, "loads": 4,
                          "corrupted_parameters": len(corrupted), "examples": corrupted[:3]}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "biencoder")

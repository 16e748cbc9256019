"""The first ZeRO-3 load probe (2026-11-27, 19:34-19:56), kept as it ran (imports reformatted by ruff since); its counts are in zero3_load_first.txt.
Launched like zero3_load_probe.py (args: an output prefix, the saved tiny BiEncoder; WHICH=auto for transformers'
AutoModel of the query tower), from a checkout whose tests/ it imports (/work/main). Counts, per launch, the gathered
parameters that are not finite or exceed 100 in magnitude over 4 loads; rank 0 appends the count to <prefix>.txt.
It reads both saved safetensors files first (as the `want` dict, unused afterwards).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/tests")
import torch
from conftest import trainer_args
from dist_worker import force_engine_on_cpu


def main(out_dir, init):
    args = trainer_args(Path(out_dir), use_cpu=False, memory_bank_size=10)  # noqa: F841 (as it ran)
    force_engine_on_cpu("deepspeed")
    import deepspeed
    from safetensors.torch import load_file

    from hf_contaccum import BiEncoder
    want = {}
    for f in Path(init).rglob("*.safetensors"):
        want.update({(str(f.parent.relative_to(init)), k): v for k, v in load_file(f).items()})
    bad = []
    for trial in range(4):
        model = (BiEncoder.from_pretrained(init) if os.environ.get("WHICH") != "auto" else __import__("transformers").AutoModel.from_pretrained(init + "/query_encoder"))
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, p in params.items():
                ok = torch.isfinite(p).all().item() and p.abs().max().item() < 100
                if not ok:
                    bad.append((trial, name, p.abs().max().item()))
    if torch.distributed.get_rank() == 0:
        open(out_dir + ".txt", "a").write(f"{len(bad)} ")  # noqa: SIM115 (as it ran)
    os._exit(0)


main(sys.argv[1], sys.argv[2])

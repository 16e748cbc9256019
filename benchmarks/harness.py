"""Shared pieces of the benchmarks: one process per configuration (so peak memory is its
own), configurations run in alternating order over repeats, medians kept."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    """Recorded with each run: results made on a GPU and on a CPU differ by their dropout masks, not only speed."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def memory_mark():
    """Memory in use now (MiB): CUDA allocations on a GPU, the process RSS on a CPU."""
    if device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def peak_memory():
    """Peak memory (MiB) since memory_mark on a GPU; the process's high-water RSS on a CPU."""
    if device() == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model_and_pairs(num_pairs, passage_suffix=False):
    """The offline MiniLM and real (definition, lemmas) pairs from the bundled WordNet extract."""
    from hf_contaccum import BiEncoder
    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path

    torch.manual_seed(0)
    model = BiEncoder.from_encoder(default_encoder_path(), normalize=True).to(device())
    train, *_ = load_wordnet_sample()
    rows = [train[i] for i in range(min(num_pairs, len(train)))]
    if passage_suffix:  # longer passages, so that activations dominate memory
        rows = [dict(r, positive=r["positive"] + " : " + r["query"] * 3) for r in rows]
    return model, rows


def provenance() -> dict:
    """Hardware, versions and command of a run, recorded with its result (docs' results pages show them)."""
    import platform

    import transformers

    hardware = device_name() if device() == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
    return {"hardware": hardware, "versions": versions, "command": "python -m " + " ".join(
        [sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else sys.argv[0]]
        + sys.argv[1:]), "date": time.strftime("%Y-%m-%d")}


def write_result(result: dict, output: str | None, default_name: str) -> str:
    """The raw result as JSON: at `output`, or benchmarks/results/<default_name>."""
    output = output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    result = {**result, "provenance": provenance()}
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    return output


def timed(fn):
    if device() == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device() == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: benchmarks is a package in it


def module_command(script: str) -> list[str]:
    """`python -m benchmarks.<name>` for a benchmark's own file: run as a module of the package, from anywhere."""
    return [sys.executable, "-m", "benchmarks." + os.path.splitext(os.path.basename(script))[0]]


def module_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **extra)


def run_grid(script, configs, repeats, extra_args=()):
    """Run benchmark `script` (its file) with `--config <json>` for every config, `repeats` times in alternating
    order, each in its own process; each run prints one JSON line. Returns {config key: [results]}."""
    runs = {json.dumps(c, sort_keys=True): [] for c in configs}
    for r in range(repeats):
        for config in configs if r % 2 == 0 else configs[::-1]:
            cmd = [*module_command(script), "--config", json.dumps(config), *extra_args]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=module_env())
            if proc.returncode != 0:
                print(f"FAILED {config}: {proc.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[json.dumps(config, sort_keys=True)].append(result)
            print(json.dumps(result), flush=True)
    return runs


def median_of(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None

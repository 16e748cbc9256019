"""Build .gpu_carry/ here, for a device call: what a GPU machine lacks and cannot download.

  .gpu_carry/wheels/   datasets (+ dill, multiprocess): the device image has no datasets
  .gpu_carry/minilm/   the offline all-MiniLM-L6-v2 in fp16 (45 MB; a call carries at most 64 MiB);
                       benchmarks/gpu_staleness.sh widens it back to fp32 there
  .gpu_carry/tasks/    the Debian and code-search tasks, built here (their text comes from this
                       machine's apt lists and Python stdlib, which differ on another image), as JSON
  .gpu_carry/test_wheels/  faiss-cpu and evaluate, which the test suite needs besides datasets (18 MiB)

    python -m benchmarks.gpu_carry        # then: run(command="bash benchmarks/gpu_staleness.sh",
                                           #           carry=[".gpu_carry/wheels", ".gpu_carry/minilm", ".gpu_carry/tasks"])
                                           # or run(command="bash benchmarks/gpu_tests.sh",
                                           #        carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"])
    (once: echo /.gpu_carry/ >> .git/info/exclude)
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def download(folder: str, *requirements: str) -> None:
    """Wheels for the device image (CPython 3.12, x86-64 Linux), once."""
    os.makedirs(folder, exist_ok=True)
    if glob.glob(os.path.join(folder, "*.whl")):
        return
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder, *requirements,
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "--only-binary=:all:"],
                   check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "..", ".gpu_carry"))
    parser.add_argument("--eval_queries", type=int, default=500)
    parser.add_argument("--corpus_size", type=int, default=3000)
    args = parser.parse_args()
    from safetensors.torch import load_file, save_file

    from benchmarks.tasks import load_task, save_task
    from hf_contaccum.quickstart import default_encoder_path

    os.makedirs(os.path.join(args.out, "tasks"), exist_ok=True)
    for task in ("debian", "code"):
        save_task(os.path.join(args.out, "tasks", f"{task}.json.gz"), load_task(task, args.eval_queries, args.corpus_size))
    source, target = default_encoder_path(), os.path.join(args.out, "minilm")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "README.md", ".*"))
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    download(os.path.join(args.out, "wheels"), "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
    download(os.path.join(args.out, "test_wheels"), "faiss-cpu==1.15.1", "evaluate==0.4.6")
    for part in sorted(os.listdir(args.out)):
        folder = os.path.join(args.out, part)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        print(f"{folder}: {size / 2**20:.1f} MiB")
    print("a device call carries at most 64 MiB with the repository: carry the folders the script names")


if __name__ == "__main__":
    main()

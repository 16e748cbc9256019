"""Launching multi-process test workers (torchrun, accelerate launch) and the environment they run in."""
import os
import re
import subprocess
import sys
import warnings

NATIVE_CRASH = re.compile(r"Signal (?:6|7|11) \((?:SIGABRT|SIGBUS|SIGSEGV)\)")


def worker_env():
    """The environment of a launched test worker: one thread per process, and this interpreter's imports."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def launch(cmd, timeout=240, check=True):
    """Run a multi-process launch (torchrun / accelerate launch of a test worker) and assert it succeeded.

    Retried once, with a warning, only when a worker died of a native crash: torch 2.13's gloo on CPU
    segfaulted inside a collective (under DeepSpeed ZeRO-2, in the functional collectives' wait, since
    replaced: once in CI, once in ~90 train-and-resume test pairs here). A Python error, a failed check
    in the worker, a hang, or a second crash still fails the test; the retried run must pass every check.
    check=False: return the finished process, failed or not (for tests that expect a refusal)."""
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout, check=False)
        crash = proc.returncode != 0 and NATIVE_CRASH.search(proc.stderr)
        if not crash or attempt == 2:
            break
        warnings.warn(f"a worker died of a native crash ({crash.group(0)}); launching once more. Its stderr ends: "
                      f"{proc.stderr[-1500:]}")
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


DIST_WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workers", "dist_worker.py")
DIST_CONFIG = {"rows": 48, "negatives": 1, "bank_chunk_size": 3, "args": {  # small cache chunks: every edge case
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "memory_bank_size": 10,
    "bank_hard_negatives": True, "mask_false_negatives": True}}


def launch_dist_worker(tmp_path, config, launcher="torchrun", timeout=240):
    """workers/dist_worker.py on 2 CPU processes; returns its result.json and the gathered parameters."""
    import json

    import torch

    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher]
    cmd += [DIST_WORKER, str(tmp_path), json.dumps(config)]
    launch(cmd, timeout=timeout)
    return json.loads((tmp_path / "result.json").read_text()), torch.load(tmp_path / "params.pt")


RESUME_WORKER = os.path.join(os.path.dirname(DIST_WORKER), "resume_worker.py")


def run_resume_worker(out, kill_at=0, resume=""):
    """workers/resume_worker.py in its own process: kill_at N > 0 kills it at step N's end, -N while checkpoint-N's
    last file is written; resume: a checkpoint folder, or "True" for the newest complete one."""
    return subprocess.run([sys.executable, RESUME_WORKER, str(out), str(kill_at), resume], env=worker_env(),
                          capture_output=True, text=True, timeout=300, check=False)

"""Bank files: a loss's memory bank in a checkpoint, written atomically, checked before it is trusted.

A bank file records what it belongs to (the optimizer step, the process count and rank, the loss's
name, the settings its vectors depend on, their width, a fingerprint of the model's weights it was
saved with) and a checksum of its tensors; loading compares each with the run that resumes and names
any difference. What is guaranteed and which tests prove it: docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid

import torch

FORMAT = 2
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is torn
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# the settings a bank's contents depend on: resuming with another value would read vectors made for the old one
BANK_SETTINGS = ("memory_bank_size", "query_memory_bank_size", "similarity", "temperature", "bank_hard_negatives",
                 "mask_false_negatives", "gather_across_devices", "bank_refresh_steps", "bank_drift_probe")


class BankFileError(ValueError):
    """A bank file that cannot be trusted: missing, unreadable, corrupted, or another run's or step's."""


def bank_file(directory: str, name: str = "", rank: int = 0) -> str:
    return os.path.join(directory, f"contaccum_bank{'_' + name if name else ''}_rank{rank}.pt")


def _settings_of(loss) -> dict:
    s = loss.settings
    similarity = s.similarity if isinstance(s.similarity, str) else getattr(s.similarity, "__name__", repr(s.similarity))
    return {"memory_bank_size": loss.bank.size, "query_memory_bank_size": loss.query_bank_size,
            "similarity": similarity, "temperature": loss.temperature, "bank_hard_negatives": loss.bank.keep_hard_negatives,
            "mask_false_negatives": loss.mask_false_negatives, "gather_across_devices": loss.gather_across_devices,
            "bank_refresh_steps": s.bank_refresh_steps, "bank_drift_probe": s.bank_drift_probe}


def _tensors(value, prefix=""):
    """(name, tensor) of every tensor in a nested state, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def checksum(state) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in _tensors(state):
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model) -> list[float]:
    """Two numbers that tell this process's weights apart from another run's or step's (sums in float64, of the
    local shard under a sharding engine)."""
    total = absolute = 0.0
    with torch.no_grad():
        for p in model.parameters():
            p = p.to_local() if hasattr(p, "to_local") else p
            if p.numel():
                total += float(p.detach().double().sum())
                absolute += float(p.detach().double().abs().sum())
    return [total, absolute]


def save_bank(loss, directory: str, *, name: str = "", rank: int = 0, processes: int = 1, step: int | None = None,
              model_fingerprint=None, run_id: str | None = None) -> str:
    """Write `loss`'s bank state to `directory` atomically (a temporary file renamed over the final name)."""
    os.makedirs(directory, exist_ok=True)
    state = loss.state_dict()
    meta = {"format": FORMAT, "global_step": step, "processes": processes, "rank": rank, "name": name,
            "settings": _settings_of(loss), "width": loss.bank.dim, "model_fingerprint": model_fingerprint,
            "run_id": run_id, "checksum": checksum(state)}
    path = bank_file(directory, name, rank)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(temporary, "wb") as f:
        torch.save({"meta": meta, "state": state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path


def read_bank(path: str) -> dict:
    """The saved {"meta", "state"}, after the file's own checks: present, readable, intact."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint has no memory bank state, so the run cannot "
                                "continue exactly. Resume from a checkpoint this library wrote with the bank, or "
                                "start without resume_from_checkpoint")
    if os.path.getsize(path) == 0:
        raise BankFileError(f"{path} is empty (0 bytes): the process was probably killed while writing it. Resume "
                            "from the checkpoint before this one")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch reports truncation, bad zip entries and foreign pickles in many ways
        raise BankFileError(f"{path} cannot be read as a memory bank file ({type(err).__name__}: {str(err)[:200]}): "
                            "it is truncated, corrupted or not a bank file. Resume from another checkpoint") from None
    if not isinstance(saved, dict) or "meta" not in saved or saved["meta"].get("format") != FORMAT:
        raise BankFileError(f"{path} is not a bank file of this version of hf_contaccum (format {FORMAT}; files of "
                            "0.1 have no checksum and are not read, see CHANGELOG.md). Resume with the version that "
                            "wrote it, or start the run anew")
    if checksum(saved["state"]) != saved["meta"]["checksum"]:
        raise BankFileError(f"{path} is corrupted: its tensors do not match the checksum written with them. Resume "
                            "from another checkpoint")
    return saved


def load_bank(loss, directory: str, *, name: str = "", rank: int = 0, processes: int = 1, step: int | None = None,
              model_fingerprint=None) -> dict:
    """Restore `loss`'s bank from `directory` after checking that it belongs to this run; returns its metadata.
    step / model_fingerprint: what the resumed run is at (None: not checked)."""
    path = bank_file(directory, name, rank)
    saved = read_bank(path)
    meta = saved["meta"]
    if meta["processes"] != processes:
        raise BankFileError(f"{path} was saved by a run of {meta['processes']} processes, this run has {processes}: "
                            "a bank is kept per process (or shared by all), so resume with the same number of "
                            f"processes ({meta['processes']})")
    if step is not None and meta["global_step"] != step:
        raise BankFileError(f"{path} was saved at step {meta['global_step']}, but training resumes at step {step}: "
                            "it belongs to another checkpoint. Put back the checkpoint's own bank files")
    current = _settings_of(loss)
    for key in BANK_SETTINGS:
        if meta["settings"].get(key) != current[key]:
            raise BankFileError(f"{path} holds a bank made with {key}={meta['settings'].get(key)!r}, this run has "
                                f"{key}={current[key]!r}: its vectors and cached scores would be wrong. resume with the same "
                                f"{key} ({meta['settings'].get(key)!r}), or start a new run")
    if loss.bank.dim is not None and meta["width"] not in (None, loss.bank.dim):
        raise BankFileError(f"{path} holds vectors of width {meta['width']}, this model's are {loss.bank.dim}")
    saved_print = meta["model_fingerprint"]
    if model_fingerprint is not None and saved_print is not None and not all(
            abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(saved_print, model_fingerprint)):
        raise BankFileError(f"{path} was saved with other weights than the ones this run resumed: it belongs to "
                            "another run (or another checkpoint of this one). Resume from the checkpoint folder that "
                            "holds this bank, or load the bank of the checkpoint you resume from")
    loss.load_state_dict(saved["state"])
    return meta


def is_torn(path: str) -> bool:
    """A checkpoint folder the Trainer did not finish: its last file, trainer_state.json, missing or cut short."""
    if not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return True
    return False


def set_torn_aside(output_dir: str) -> list[tuple[str, str]]:
    """Rename every torn checkpoint-N in `output_dir` to checkpoint-N.torn, so that resume_from_checkpoint=True
    finds the newest complete one. Returns (old, new) paths."""
    moved = []
    if not os.path.isdir(output_dir):
        return moved
    for entry in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, entry)
        if CHECKPOINT.match(entry) and is_torn(path):
            target = path + ".torn"
            suffix = 1
            while os.path.exists(target):
                suffix += 1
                target = f"{path}.torn{suffix}"
            os.replace(path, target)
            moved.append((path, target))
    return moved


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-N in `output_dir`, or None."""
    found = [(int(m.group(1)), entry) for entry in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
             if (m := CHECKPOINT.match(entry)) and not is_torn(os.path.join(output_dir, entry))]
    return os.path.join(output_dir, max(found)[1]) if found else None

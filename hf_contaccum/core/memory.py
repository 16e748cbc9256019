"""Will it fit? An allocation checked against the device's free memory before it is made."""
from __future__ import annotations

import os

import torch

# the share of the free memory one allocation of ours may take: the encoder, its activations and the
# optimizer need the rest
SHARE = 0.5


def free_bytes(device) -> int | None:
    """Free memory on `device` (CUDA: the driver's count; CPU: MemAvailable), or None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(nbytes: int, device, what: str) -> None:
    """Raise MemoryError naming `what` when `nbytes` exceeds SHARE of the free memory on `device`."""
    free = free_bytes(device)
    if free is not None and nbytes > SHARE * free:
        raise MemoryError(f"{what} needs about {gib(nbytes)} on {device}, where {gib(free)} is free (at most half "
                          "of it is left to the bank: the encoder needs the rest). Use a smaller memory_bank_size "
                          "(about the pairs of one optimizer step: 'auto')")

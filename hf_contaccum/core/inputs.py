"""What a ContAccumLoss micro-step is given, checked, and what it reports: shapes, keys, the bank's fit."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    num_rows: int  # loss rows: current queries (all processes) + banked queries
    num_columns: int  # candidate passages per row (negatives per query = this - 1)
    uniform_loss: float  # the loss if every candidate scored the same: log of the candidates
    banked_columns: int = 0  # candidates read from the memory bank
    masked: torch.Tensor | None = None  # candidates masked as duplicates of a row's positive, over the current rows
    maskable: int = 0  # ... of at most this many (every candidate but each row's positive)


def autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False)


def check_bank_fits(size: int, per_process: int, processes: int = 1) -> None:
    """A bank smaller than one (gathered) micro-batch would be overwritten before anything reads it."""
    rows = per_process * processes
    if 0 < size < rows:
        where = f" ({processes} processes x {per_process})" if processes > 1 else ""
        raise ValueError(
            f"memory_bank_size={size} is smaller than one micro-batch of {rows} pairs{where}: each micro-batch "
            f"would overwrite the bank before anything reads it. Use memory_bank_size >= {rows} (about the pairs of "
            "one optimizer step, 'auto', is a good start) or 0 for plain gradient accumulation")


def check_inputs(queries, positives, positive_keys, hard_negatives, hard_negative_keys, bank_dim=None) -> None:
    n = queries.shape[0]
    if bank_dim is not None and queries.dim() == 2 and queries.shape[1] != bank_dim:
        raise ValueError(f"vectors of width {queries.shape[1]} for a memory bank of width {bank_dim} (a restored bank "
                         "is another model's, or the model changed): resume with the model the bank was made with")
    if queries.dim() != 2 or positives.dim() != 2 or positives.shape != queries.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must both be "
                         "(n, d): one positive per query")
    if positive_keys is not None and tuple(positive_keys.shape) != (n,):
        raise ValueError(f"positive_keys has shape {tuple(positive_keys.shape)}, expected ({n},)")
    if hard_negatives is not None:
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != n or hard_negatives.shape[2] != queries.shape[1]:
            raise ValueError(f"hard_negatives has shape {tuple(hard_negatives.shape)}, expected ({n}, H, "
                             f"{queries.shape[1]}): H hard negatives per query")
        if hard_negative_keys is not None and tuple(hard_negative_keys.shape) != tuple(hard_negatives.shape[:2]):
            raise ValueError(f"hard_negative_keys has shape {tuple(hard_negative_keys.shape)}, expected "
                             f"{tuple(hard_negatives.shape[:2])}")

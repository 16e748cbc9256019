"""Tokenised features ({"input_ids": (n, width), "attention_mask": ..., ...}): rows, widths and slices."""
from __future__ import annotations

import torch


def used_width(attention_mask: torch.Tensor) -> int:
    """One past the last token column that any row attends to (0 if none): the width that cutting off the
    all-padding columns at the end keeps. One read of the device."""
    if attention_mask.shape[1] == 0:
        return 0
    used = attention_mask.bool().any(0)
    return int((used * torch.arange(1, used.shape[0] + 1, device=used.device)).max())


def num_rows(features: dict) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), torch.Tensor):
            return features[key].shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def slice_features(features: dict, begin: int, end: int) -> dict:
    """Rows [begin, end) of tokenised features, without the trailing token columns that are padding
    in every one of those rows (a chunk then costs what a batch of its own texts would)."""
    mask = features.get("attention_mask")
    width = keep = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        width = mask.shape[1]
        keep = used_width(mask[begin:end]) or width
    out = {}
    for key, value in features.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
        elif value.dim() >= 2 and value.shape[1] == width:
            out[key] = value[begin:end, :keep].contiguous()  # a view's strides would make torch.compile recompile
        else:
            out[key] = value[begin:end]
    return out


def token_counts(features: dict) -> list[int] | None:
    """Real tokens per row (from the attention mask), or None without one."""
    mask = features.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.sum(1).tolist()

"""A passage's identity, one way for every front end: its id where the data gives one, else its tokens.

Two passages with the same key are the same passage: it is never a negative of a query it is relevant
to, in the batch or in the bank. Keys are 62/63-bit non-negative int64s; the loss gives passages
without keys negative ones that never match.
"""
from __future__ import annotations

import functools
import hashlib

import torch

_PRIMES = (2_147_483_647, 2_147_483_629)  # two 31-bit moduli: a text's key is 62 bits, no int64 overflow


def id_key(value) -> int:
    """A stable 63-bit key of an id value (Python's hash() differs per process)."""
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@functools.lru_cache(maxsize=64)
def _hash_weights(prime: int, seed: int, width: int, device: torch.device) -> torch.Tensor:
    """Fixed random weights per token position (the same in every process and on every device: drawn on the CPU),
    made once per batch width and device. Kept on the device: a copy from the host per batch would be a blocking
    transfer, i.e. a host sync, on a GPU."""
    return torch.randint(1, prime, (width,), generator=torch.Generator().manual_seed(seed)).to(device)


def token_keys(features: dict) -> torch.Tensor | None:
    """A 62-bit key per text from its token ids (equal tokens, equal key), computed on the device. The position is
    counted over real tokens, so left or right padding and batch width do not matter. None for inputs that are not
    token ids (e.g. images): nothing is masked then."""
    ids, mask = features.get("input_ids"), features.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    mask = torch.ones_like(ids) if mask is None else mask.long()
    position = (mask.cumsum(1) - 1).clamp(min=0)
    tokens, length = ids.long() + 1, mask.sum(1)  # (once for both moduli: a GPU micro-step is launch-bound)
    key = None
    for prime, seed in zip(_PRIMES, (1, 2)):
        term = tokens % prime * _hash_weights(prime, seed, ids.shape[1], ids.device)[position] % prime * mask
        part = (term.sum(1) + length) % prime
        key = part if key is None else key * prime + part
    return key


def passage_keys(ids: list, features: dict) -> torch.Tensor:
    """Each passage's key: id_key of its id where given (not None), else its token key."""
    keys = token_keys(features)
    given = [i for i, value in enumerate(ids) if value is not None]
    if given:
        keys = keys.clone()
        keys[given] = torch.tensor([id_key(ids[i]) for i in given], dtype=torch.long)
    return keys

"""ContAccumSettings: the ContAccum settings, one dataclass for every front end, checked in one place.

ContAccumTrainingArguments inherits these fields, the sentence-transformers losses and the plain
ContAccumLoss build one from their arguments. The method behind each setting is in
docs/how-it-works.md; which values measured well is in docs/choosing-a-method.md.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SIMILARITIES = ("dot", "cos")
# unit vectors score in [-1, 1]: a temperature of 1 leaves every candidate nearly alike (docs/choosing-a-method.md)
DEFAULT_TEMPERATURE = {"dot": 1.0, "cos": 0.05}


def normalize(x: torch.Tensor, similarity) -> torch.Tensor:
    """The vector a similarity compares, in fp32: unit length for "cos", as it is for "dot" or a custom function."""
    x = x.float()
    return F.normalize(x, dim=-1) if similarity == "cos" else x


def score(a: torch.Tensor, b: torch.Tensor, similarity) -> torch.Tensor:
    """(len a, len b) similarities of vectors already passed through `normalize`."""
    return a @ b.T if similarity in SIMILARITIES else similarity(a, b)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ContAccumSettings:
    """What ContAccum does with the memory bank: its size, the loss over it, and the guards around it."""

    memory_bank_size: str = field(default="auto", metadata={"help": (
        "Size of the memory bank in samples: past (query, positive) pairs kept as extra rows and columns of the "
        "loss. 'auto' (default) is the pairs of one optimizer step (per_device_train_batch_size x "
        "gradient_accumulation_steps x processes sharing the bank); 0 is plain gradient accumulation. "
        "How to choose: docs/choosing-a-method.md.")})  # typed str: the command line takes a number or "auto"
    query_memory_bank_size: int | None = field(default=None, metadata={"help": (
        "Ablation: a smaller query bank (default: memory_bank_size). 0 keeps passages only (pre-batch negatives), "
        "which unbalances the two sides' gradients (docs/how-it-works.md#why-both-banks).")})
    similarity: str = field(default="dot", metadata={"help": "'dot' (dot product) or 'cos' (cosine similarity)."})
    temperature: float | None = field(default=None, metadata={"help": (
        "Logits are similarity / temperature. Default: 0.05 with 'cos', 1.0 with 'dot' (the paper).")})
    bank_hard_negatives: bool = field(default=False, metadata={"help": (
        "Also bank each query's hard negatives, as further columns for later micro-batches.")})
    mask_false_negatives: bool = field(default=True, metadata={"help": (
        "Never use a passage as a negative of a query it is relevant to: the same passage id (column positive_id) "
        "or, without ids, the same text as the query's positive.")})
    gather_across_devices: bool = field(default=True, metadata={"help": (
        "With several processes, share every micro-batch across them (with gradient), so the bank is one global "
        "pool, identical on every process. False: each process keeps its own bank.")})
    bank_refresh_steps: int = field(default=0, metadata={"help": (
        "Every N optimizer steps, encode every banked pair again with the current encoder (2 x memory_bank_size "
        "forward passes without gradient); 0 = off. For encoders that move fast: docs/staleness.md.")})
    bank_drift_probe: int = field(default=0, metadata={"help": (
        "Move every banked vector by the encoder's common drift, measured each step on the first N training pairs "
        "(2 x N forward passes without gradient); 0 = off. For training from scratch: docs/staleness.md.")})
    reset_bank_each_step: bool = field(default=False, metadata={"help": (
        "Ablation: empty the bank after every optimizer step (the paper's 'without past encoders').")})
    collapse_patience: int = field(default=10, metadata={"help": (
        "Stop with an error when the embeddings have collapsed for this many optimizer steps; 0 = off. "
        "docs/reliability.md#the-collapse-guard.")})

    def __post_init__(self):
        self.check()

    @property
    def temperature_value(self) -> float:
        return DEFAULT_TEMPERATURE.get(self.similarity, 1.0) if self.temperature is None else float(self.temperature)

    @property
    def query_bank_size(self) -> int:
        """The query bank's size (the ablation's, else the bank's); needs a resolved memory_bank_size."""
        return self.memory_bank_size if self.query_memory_bank_size is None else self.query_memory_bank_size

    def resolved(self, pairs_per_step: int) -> ContAccumSettings:
        """A copy with "auto" replaced by `pairs_per_step`, the pairs of one optimizer step."""
        return dataclasses.replace(self, memory_bank_size=self.bank_size(pairs_per_step))

    def bank_size(self, pairs_per_step: int | None = None) -> int:
        value = self.memory_bank_size
        if isinstance(value, str) and value.strip().lower() == "auto":
            if pairs_per_step is None:
                raise ValueError("memory_bank_size='auto' is the pairs of one optimizer step, which only a Trainer "
                                 "knows: outside one, give a number (per-device batch x accumulation steps x "
                                 "processes)")
            return int(pairs_per_step)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"memory_bank_size must be a number of samples or 'auto', got {value!r}") from None
        return value

    def check(self) -> None:
        """Every setting alone and every combination; raises ValueError naming the setting and the fix."""
        size = self.memory_bank_size
        if not (isinstance(size, str) or is_integer(size)):
            raise ValueError(f"memory_bank_size must be a whole number of samples or 'auto', got {size!r}")
        size = None if isinstance(size, str) and size.strip().lower() == "auto" else self.bank_size()
        for name in ("query_memory_bank_size", "bank_refresh_steps", "bank_drift_probe", "collapse_patience"):
            value = getattr(self, name)
            if value is not None and not is_integer(value):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name, value in (("memory_bank_size", size), ("query_memory_bank_size", self.query_memory_bank_size)):
            if value is not None and value < 0:
                raise ValueError(f"{name} is a number of samples and must be >= 0 (0 disables the bank), got {value}")
        if not (self.similarity in SIMILARITIES or callable(self.similarity)):
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        temperature = self.temperature_value
        if not (isinstance(temperature, float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.similarity == "cos" and temperature >= 0.5:
            warnings.warn(f"similarity='cos' with temperature={temperature}: unit vectors score in [-1, 1], so every "
                          "candidate's logit is nearly the same and the loss barely moves from log(candidates). "
                          "Usual: 0.01 to 0.1 (the default 0.05); see docs/choosing-a-method.md", stacklevel=3)
        query = self.query_memory_bank_size
        if size is not None and query is not None and query > size:
            raise ValueError(f"query_memory_bank_size ({query}) > memory_bank_size ({size}): a banked query needs its "
                             "banked positive as a column; make memory_bank_size at least as large")
        for name in ("bank_refresh_steps", "bank_drift_probe", "collapse_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("bank_refresh_steps", "bank_drift_probe"):
            if getattr(self, name) and size == 0:
                raise ValueError(f"{name} updates the memory bank, and memory_bank_size is 0: give the bank a size, "
                                 f"or set {name}=0")
        if self.bank_refresh_steps and self.bank_hard_negatives:
            raise ValueError("bank_refresh_steps re-encodes banked queries and positives, not banked hard negatives: "
                             "set bank_hard_negatives=False or bank_refresh_steps=0")
        if self.bank_refresh_steps and self.bank_drift_probe:
            raise ValueError("bank_drift_probe and bank_refresh_steps are two staleness controls for the same thing "
                             "(the refresh re-encodes the whole bank, the probe moves it by a measured drift): set "
                             "one of them to 0")
        if query is not None and size is not None and query < size:
            warnings.warn(f"query_memory_bank_size {query} < memory_bank_size {size}: {size - query} banked passages "
                          "are negatives without their queries as loss rows, so the passage side's gradient outgrows "
                          "the query side's. Use equal sizes unless this is an ablation "
                          "(docs/how-it-works.md#why-both-banks)", stacklevel=3)


RETIRED = {  # setting -> why, for the error a retired setting gives (CHANGELOG.md, 0.2.0)
    "bank_weight": "it beat the default bank on no task where the bank it down-weights did not do as well",
    "bank_warmup_steps": "it beat the default bank on no task where the bank it delays did not do as well",
    "bank_chunk_size": "the cache sizes its chunks itself (docs/how-it-works.md#the-log-sum-exp-cache)",
}


def refuse_retired(**given) -> None:
    """Raise for a retired setting given a value other than its old default (CHANGELOG.md has the measurements)."""
    defaults = {"bank_weight": 1.0, "bank_warmup_steps": 0, "bank_chunk_size": None}
    for name, value in given.items():
        if value != defaults[name]:
            raise ValueError(f"{name} was retired in hf_contaccum 0.2.0: {RETIRED[name]}. Remove it (CHANGELOG.md "
                             "lists the measurement that retired it)")


def legacy_arguments(owner: str, extra: dict, query_memory_bank_size):
    """0.1's argument names, for one release: query_bank_size (renamed: warns, returns its value), the retired
    settings (refused unless at their old default); anything else is a TypeError."""
    if "query_bank_size" in extra:
        warnings.warn("query_bank_size is now query_memory_bank_size", FutureWarning, stacklevel=3)
        query_memory_bank_size = extra.pop("query_bank_size")
    unknown = set(extra) - set(RETIRED)
    if unknown:
        raise TypeError(f"{owner} got unexpected arguments {sorted(unknown)}")
    refuse_retired(**extra)
    return query_memory_bank_size

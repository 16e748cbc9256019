"""ContAccumTrainingArguments: transformers' TrainingArguments plus the ContAccum settings and the batch layout."""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..settings import ContAccumSettings, refuse_retired
from .guards import check_cuda_graphs

HIDDEN = {"help": argparse.SUPPRESS}  # accepted for one release, not listed in --help (CHANGELOG.md)


@dataclass
class ContAccumTrainingArguments(TrainingArguments, ContAccumSettings):
    """TrainingArguments + ContAccumSettings (the bank and the loss) + how batches are encoded.

    memory_bank_size="auto" becomes the pairs of one optimizer step here: per_device_train_batch_size x
    gradient_accumulation_steps x the processes that share the bank."""

    gradcache_chunk_size: int | None = field(default=None, metadata={"help": (
        "GradCache (None = off): encode each micro-batch in chunks of this many queries without a graph, compute "
        "the loss on the detached vectors, then replay each chunk (same dropout) with the cached gradients: exact "
        "large micro-batches at one chunk's activation memory, for a second forward pass. Combines with the bank "
        "(the hybrid): docs/gradcache.md.")})
    one_tower_call: bool = field(default=False, metadata={"help": (
        "Shared tower only: encode a micro-batch's queries and passages in one forward call (the shorter side "
        "padded to the longer): half the kernel launches for more padded tokens. For launch-bound GPU steps with "
        "queries and passages of similar length: docs/performance.md.")})
    tokenize_once: bool = field(default=True, metadata={"help": (
        "Tokenise a datasets.Dataset once before training (datasets.map, cached for file-backed data), so that "
        "each micro-batch is only padded; False tokenises every batch in the collator. Streams always are.")})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": (
        "Pad every batch's token length up to a multiple of this (e.g. 16 or 64): with torch_compile=True it bounds "
        "the number of distinct shapes, so compiled graphs are reused instead of recompiled.")})
    query_max_length: int = field(default=64, metadata={"help": "Max tokens of a query (longer is truncated)."})
    passage_max_length: int = field(default=256, metadata={"help": "Max tokens of a passage (longer is truncated)."})
    max_hard_negatives: int | None = field(default=None, metadata={"help": (
        "Use at most this many hard negatives per query from the data (default: all).")})
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": (
        "transformers' filter of non-finite losses from the logged loss. Off here: a non-finite loss or gradient "
        "stops training before its step is applied (docs/reliability.md).")})
    remove_unused_columns: bool = field(default=False, metadata={"help": (
        "Kept False: the collator needs the raw text columns.")})
    logging_steps: float = field(default=0.05, metadata={"help": (
        "Log every N optimizer steps, or, below 1, every such fraction of the run (default: 20 log lines a run).")})
    # retired or renamed in 0.2.0: accepted for one release (CHANGELOG.md)
    passage_memory_bank_size: int | None = field(default=None, metadata=HIDDEN)
    bank_weight: float = field(default=1.0, metadata=HIDDEN)
    bank_warmup_steps: int = field(default=0, metadata=HIDDEN)
    bank_chunk_size: int | None = field(default=None, metadata=HIDDEN)

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        refuse_retired(bank_weight=self.bank_weight, bank_warmup_steps=self.bank_warmup_steps,
                       bank_chunk_size=self.bank_chunk_size)
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            self.dataloader_pin_memory = False  # pinning serves a GPU; training on a CPU it only prints a warning
        if self.gradient_accumulation_steps < 1 or self.per_device_train_batch_size < 1:
            raise ValueError(f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) and "
                             f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be >= 1")
        for name in ("gradcache_chunk_size", "pad_to_multiple_of", "max_hard_negatives"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "max_hard_negatives" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'max_hard_negatives' else 1} (or None), got {value}")
        processes = self.world_size if self.gather_across_devices else 1
        self.memory_bank_size = self.bank_size(self.per_device_train_batch_size * self.gradient_accumulation_steps
                                               * processes)
        if self.passage_memory_bank_size is not None:
            warnings.warn("passage_memory_bank_size is retired: memory_bank_size is the passage bank and "
                          "query_memory_bank_size the ablation's smaller query bank", FutureWarning, stacklevel=3)
            if self.query_memory_bank_size is None:
                self.query_memory_bank_size = self.memory_bank_size
            self.memory_bank_size, self.passage_memory_bank_size = self.passage_memory_bank_size, None
        ContAccumSettings.check(self)
        check_cuda_graphs(self, gradcache=self.gradcache_chunk_size is not None)

    def contaccum_settings(self) -> ContAccumSettings:
        """The ContAccum settings alone (memory_bank_size resolved), for ContAccumLoss."""
        names = [f.name for f in dataclasses.fields(ContAccumSettings)]
        with warnings.catch_warnings():  # warned once already, by __post_init__
            warnings.simplefilter("ignore")
            return ContAccumSettings(**{name: getattr(self, name) for name in names})

    @property
    def passage_bank_size(self) -> int:
        warnings.warn("passage_bank_size is now memory_bank_size", FutureWarning, stacklevel=2)
        return self.memory_bank_size

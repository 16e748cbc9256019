"""ContAccumTrainingArguments: TrainingArguments plus the memory bank and loss settings."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .loss import check_bank_updates


@dataclass
class ContAccumTrainingArguments(TrainingArguments):
    memory_bank_size: str = field(default="auto", metadata={"help": (
        "Size in SAMPLES of both memory banks (past query vectors and their aligned positive passages), or "
        "'auto' (the default): N_total, the pairs of one optimizer step (per_device_train_batch_size x "
        "gradient_accumulation_steps x processes sharing the bank), the best ContAccum setting on 3 of the 4 "
        "tasks measured (a 4x bank won on Debian; elsewhere larger banks of stale vectors lost quality; a 4x bank "
        "refreshed every step, bank_refresh_steps=1, beat it on all three at N_total 32 for 2.7x the compute, but "
        "not on WordNet at N_total 128). "
        "0 = plain gradient accumulation. Paper: 128 "
        "(small sets) to 2048 (NQ); MS MARCO 1024.")})
    query_memory_bank_size: int | None = field(default=None, metadata={"help": (
        "Ablation override of the query bank size (default: memory_bank_size). 0 = pre-batch negatives "
        "(passage bank only), which unbalances the towers' gradient norms (paper §3.3). Must be <= the passage bank; "
        "smaller warns: a query bank of N_total with a 4x passage bank scored below plain gradient accumulation "
        "on all three real tasks measured (README, Staleness controls).")})
    passage_memory_bank_size: int | None = field(default=None, metadata={"help": (
        "Ablation override of the passage bank size (default: memory_bank_size).")})
    temperature: float = field(default=1.0, metadata={"help": (
        "Softmax temperature tau: logits are similarity / tau. Paper: 1.0 with dot product; use ~0.05 with cos.")})
    similarity: str = field(default="dot", metadata={"help": "Similarity: 'dot' (dot product) or 'cos' (cosine)."})
    bank_hard_negatives: bool = field(default=False, metadata={"help": (
        "Also bank each query's hard negatives (H per entry) as extra columns for later micro-batches.")})
    reset_bank_each_step: bool = field(default=False, metadata={"help": (
        "Empty the bank after every optimizer step. Default False: the paper keeps entries from past encoders, "
        "and dropping them costs 2.3 Top@20 in its ablation.")})
    bank_weight: float = field(default=1.0, metadata={"help": (
        "Staleness control, in (0, 1]: every banked entry counts this many times (a banked negative adds w to a "
        "query's softmax denominator, a banked query row weighs w in the mean). 1 is the paper; smaller trusts "
        "vectors from past encoders less; towards 0 it becomes gradient accumulation.")})
    bank_warmup_steps: int = field(default=0, metadata={"help": (
        "Fill the bank but do not read it for the first N optimizer steps (XBM's warm-up: banked vectors go "
        "stale fastest early, while the encoder moves most).")})
    bank_refresh_steps: int = field(default=0, metadata={"help": (
        "Staleness control: every N optimizer steps, encode every banked pair again with the current encoder (no "
        "gradient) before the step, so no banked vector is older than N steps (ANCE's periodic refresh; 0 = off, "
        "the paper). Costs 2 x N_mem forward passes per refresh (split between the processes sharing a global "
        "bank) and keeps the banked texts' token ids; not with bank_hard_negatives. Measured: an encoder trained "
        "from scratch (lr 5e-4) collapsed with every stale bank and learned with a refresh every step (README).")})
    bank_drift_probe: int = field(default=0, metadata={"help": (
        "Staleness control, cheaper than bank_refresh_steps: keep the first N pairs of each process as a probe, "
        "encode them without dropout at the start of every optimizer step, and move every banked vector by the "
        "change of the probe's mean vector since the last step (the encoder's common drift). Costs 2 x N forward "
        "passes without gradient per step. 0 = off (the paper). Not with bank_refresh_steps. Measured (README): from "
        "scratch it removed the collapse of a plain bank (probe 8); on a pretrained MiniLM it changed nothing for "
        "N_mem = N_total and recovered part of what a full refresh gains for a 4x bank.")})
    mask_false_negatives: bool = field(default=True, metadata={"help": (
        "Never use a passage as a negative of a query it is relevant to: columns with the same passage id "
        "(column positive_id) or, without ids, the same text as the row's positive are masked.")})
    gather_across_devices: bool = field(default=True, metadata={"help": (
        "With several processes, share every micro-batch across them (with gradient), so each query sees all "
        "processes' passages and the bank is one global pool, identical on every rank. False: each process "
        "trains on its own micro-batch and keeps its own bank.")})
    gradcache_chunk_size: int | None = field(default=None, metadata={"help": (
        "GradCache mode (None = off): encode the local batch in chunks of this many queries without a graph, "
        "compute the loss on the detached vectors, then replay each chunk (same dropout) and back-propagate "
        "the cached vector gradients. Exact large local batches at one chunk's activation memory, for a second "
        "forward pass. Combines with memory_bank_size (the hybrid).")})
    collapse_patience: int = field(default=10, metadata={"help": (
        "Stop with an error naming causes and fixes when every embedding has been the same vector, or the loss "
        "has been back at the log of the number of candidates after the run had learned (collapse), for this many "
        "optimizer steps in a row, or has never left that value while reading the memory bank for 5 x this many "
        "(stuck); checked before the step's checkpoint is saved. 0 turns the check off.")})
    tokenize_once: bool = field(default=True, metadata={"help": (
        "Tokenise a datasets.Dataset once before training (datasets.map, cached for file-backed data), so that "
        "each micro-batch is only padded; False tokenises every batch in the collator. Streams always are.")})
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": (
        "Pad every batch's token length up to a multiple of this (e.g. 16 or 64). With torch_compile=True it bounds "
        "the number of distinct shapes, so compiled graphs are reused instead of recompiled; the price is the "
        "compute on the extra padding. Default: pad to the longest text of the batch.")})
    one_tower_call: bool = field(default=False, metadata={"help": (
        "Shared tower only: encode a micro-batch's queries and passages in ONE forward call (the shorter side "
        "padded at the end to the longer length) instead of two: half the kernel launches per micro-step for "
        "more padded tokens of compute. Embeddings are unchanged. For launch-bound micro-steps whose queries "
        "and passages are of similar length; on a CPU a step took 0.59x (tiny BERT, similar lengths) to 1.67x "
        "(MiniLM, short queries and long passages) the time of two calls; on an H200 (bert-base, 32-token queries, "
        "256-token passages) 0.71x. Off by default: it costs memory for the padding (18 percent more at peak "
        "there).")})  # no percent sign: argparse formats help strings
    query_max_length: int = field(default=64, metadata={"help": "Max tokens of a query (longer is truncated)."})
    passage_max_length: int = field(default=256, metadata={"help": "Max tokens of a passage (longer is truncated)."})
    max_hard_negatives: int | None = field(default=None, metadata={"help": (
        "Use at most this many hard negatives per query from the data (default: all).")})
    bank_chunk_size: int | None = field(default=None, metadata={"help": (
        "Bank slots per cached log-sum-exp block (advanced). Default: about 20 N_mem / d (N_mem 65,536, d 768: "
        "1,737), which keeps the cache near 1/20 of the bank vectors' own size at any N_mem while an enqueue "
        "refreshes ~(4 N_local + granule) x N_mem x d multiply-adds (granule ~ chunk^2 / N_mem slots).")})
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": (
        "transformers' filter of non-finite losses from the logged loss. Off here: a non-finite loss stops "
        "training before its step is applied (checked once per optimizer step), so the filter's host sync "
        "per micro-batch would buy nothing.")})
    remove_unused_columns: bool = field(default=False, metadata={"help": (
        "Kept False: the collator needs the raw text columns.")})
    logging_steps: float = field(default=0.05, metadata={"help": (
        "Log every N optimizer steps, or, below 1, every such fraction of the run. Default 0.05: 20 log lines "
        "per run, and every step of a short run, so the loss and the bank statistics always show.")})

    def __post_init__(self):
        super().__post_init__()
        self.memory_bank_size = self._bank_size(self.memory_bank_size)  # 'auto' or '1024' (command line) -> int
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            self.dataloader_pin_memory = False  # pinning serves a GPU; training on a CPU it only prints a warning
        for name in ("memory_bank_size", "query_memory_bank_size", "passage_memory_bank_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} is a number of samples and must be >= 0 (0 disables the bank), got {value}")
        if self.similarity not in ("dot", "cos"):
            raise ValueError(f"similarity must be 'dot' or 'cos', got {self.similarity!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.gradcache_chunk_size is not None and self.gradcache_chunk_size < 1:
            raise ValueError(f"gradcache_chunk_size must be >= 1 query per chunk (or None to disable), got "
                             f"{self.gradcache_chunk_size}")
        if not 0 < self.bank_weight <= 1:
            raise ValueError(f"bank_weight must be in (0, 1] (1: every banked entry counts fully), got {self.bank_weight}")
        if self.bank_warmup_steps < 0:
            raise ValueError(f"bank_warmup_steps must be >= 0, got {self.bank_warmup_steps}")
        check_bank_updates(self.bank_refresh_steps, self.bank_drift_probe, self.passage_bank_size,
                           self.bank_hard_negatives)
        if self.bank_chunk_size is not None and self.bank_chunk_size < 1:
            raise ValueError(f"bank_chunk_size must be >= 1, got {self.bank_chunk_size}")
        check_cuda_graphs(self, gradcache=self.gradcache_chunk_size is not None)
        if self.query_bank_size > self.passage_bank_size:
            raise ValueError(
                f"query bank ({self.query_bank_size}) larger than passage bank ({self.passage_bank_size}): a banked "
                "query needs its banked positive as a column; raise passage_memory_bank_size")

    def _bank_size(self, value) -> int:
        if isinstance(value, str) and value.strip().lower() == "auto":
            processes = self.world_size if self.gather_across_devices else 1
            return self.per_device_train_batch_size * self.gradient_accumulation_steps * processes
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"memory_bank_size must be a number of samples or 'auto', got {value!r}") from None

    @property
    def query_bank_size(self) -> int:
        return self.memory_bank_size if self.query_memory_bank_size is None else self.query_memory_bank_size

    @property
    def passage_bank_size(self) -> int:
        return self.memory_bank_size if self.passage_memory_bank_size is None else self.passage_memory_bank_size


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that run the model under CUDA graphs


def check_cuda_graphs(args, gradcache: bool) -> None:
    """Refuse torch.compile's CUDA graphs with more than one backward per optimizer step, before training.

    CUDA graph trees own the memory of a compiled backward's outputs, and autograd installs the first micro-batch's
    parameter gradients as the .grad tensors themselves; the next micro-batch's replay can then overwrite them
    (pytorch/pytorch#96693: silently wrong accumulated gradients; #169545: an error in other releases). Gradient
    accumulation is this library's whole point, and GradCache back-propagates once per chunk, so both are refused
    rather than risked. With one backward per step the optimizer consumes the gradients before the next replay, so
    CUDA graphs are allowed there.

    What is compiled, and how, is what accelerate will use: the Trainer hands it torch_compile_backend and
    torch_compile_mode, and accelerate takes what they leave unset from the environment (`accelerate launch
    --dynamo_backend ... --dynamo_mode ...`, or an accelerate config file)."""
    backend = str(args.torch_compile_backend or os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")).lower()
    mode = args.torch_compile_mode or os.environ.get("ACCELERATE_DYNAMO_MODE", "default")
    if backend == "no" or not (mode in CUDA_GRAPH_MODES or backend == "cudagraphs"):
        return
    backwards = []  # what makes several backward passes per optimizer step
    if args.gradient_accumulation_steps > 1:
        backwards.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps}")
    if gradcache:
        backwards.append("GradCache (a backward per chunk)")
    if backwards:
        if mode in CUDA_GRAPH_MODES:
            what = f"torch_compile_mode={mode!r}" if args.torch_compile_mode else f"ACCELERATE_DYNAMO_MODE={mode!r}"
        else:
            what = f"torch_compile_backend={backend!r}" if args.torch_compile_backend else \
                f"ACCELERATE_DYNAMO_BACKEND={backend!r}"
        raise ValueError(
            f"{what} runs the model under CUDA graphs, and {' and '.join(backwards)} means several backward passes "
            "per optimizer step: PyTorch's CUDA graph trees can overwrite the gradients accumulated so far with a "
            "later micro-batch's (pytorch/pytorch#96693, #169545: silently wrong gradients in some releases). Use "
            "the default mode (torch_compile=True; in accelerate's settings --dynamo_mode default) or "
            "'max-autotune-no-cudagraphs', with pad_to_multiple_of to bound recompilations. CUDA graphs are "
            "allowed with one backward per step (gradient_accumulation_steps=1, no GradCache).")


def check_single_accumulation_division() -> None:
    """Refuse a Trainer whose accelerator would divide the loss by the accumulation steps a second time.

    The Trainer divides each micro-batch's loss by gradient_accumulation_steps itself. transformers 5.0 to 5.5.3
    also handed the steps to accelerate, whose backward divides again (fixed in 5.5.4, which hands it 1): every
    gradient came out K times too small — a scale that Adam almost hides, but that the gradient clipping
    threshold, SGD and GradCache's cached gradients do not (our reference tests failed on 5.2 to 5.5.3, passed
    on 5.5.4). pip keeps transformers at this library's floor (5.18) or above; this catches an older one
    installed beside it (--no-deps, a pinned image). Call after the Trainer has built its Accelerator. DeepSpeed
    is exempt: its engine scales by its own steps, and the Trainer tells accelerate not to."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    steps = GradientState().num_steps
    if steps > 1 and AcceleratorState().distributed_type != DistributedType.DEEPSPEED:
        import transformers

        raise RuntimeError(
            f"accelerate was given gradient_accumulation_steps={steps}, so its backward divides every loss by {steps} "
            "after the Trainer has already divided it: gradients would come out that many times too small. "
            f"transformers {transformers.__version__} does this (5.0 to 5.5.3 did; fixed in 5.5.4): "
            "pip install 'transformers>=5.18' (this library's floor).")


def average_of_ones(device) -> float:
    """What the default process group's reduce-scatter returns, asked for ReduceOp.AVG of a 1 from every process:
    1.0 where it averages (gloo in torch 2.7 and 2.8 returned the number of processes)."""
    import torch.distributed as dist

    averaged = torch.empty(1, device=device)
    # torch 2.13 renamed reduce_scatter_tensor (deprecated there) reduce_scatter_single
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(averaged, torch.ones(dist.get_world_size(), device=device), op=dist.ReduceOp.AVG)
    return averaged.item()


def check_fsdp2_gradient_average() -> None:
    """Refuse FSDP2 on a process group whose reduce-scatter sums where FSDP2 asks it to average.

    FSDP2 reduce-scatters fp32 gradients with ReduceOp.AVG. gloo (the CPU backend) accepted AVG there and summed
    in torch 2.7 and 2.8 (pytorch/pytorch#162338, a silent correctness bug; 2.9.0 and later average): every gradient
    came out world-size times too large. Adam nearly hides that scale, clipping and SGD do not (our FSDP2 test with
    SGD on torch 2.7 and 2.8: exactly 2x the single-process update on 2 processes). Rather than trust version
    numbers, this asks the group itself (average_of_ones on the training device) whenever FSDP2 runs. Call after
    the Trainer has built its Accelerator (every process calls it: it is a collective)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    if not (state.is_fsdp2 and dist.is_initialized()):
        return
    world, average = dist.get_world_size(), average_of_ones(state.device)
    if average != 1.0:
        raise RuntimeError(
            f"FSDP2 on this process group would sum the gradients of the {world} processes instead of averaging "
            f"them: torch {torch.__version__}'s reduce-scatter on {state.device} returned {average:g} for the "
            f"average of {world} ones (gloo in torch 2.7 and 2.8: pytorch/pytorch#162338). Gradients would come out "
            f"{world}x too large. pip install 'torch>=2.9', or use DDP (accelerate_configs/cpu_2proc.yaml) on CPU "
            "processes.")


def check_gradient_scale() -> None:
    """Refuse, before training, a stack that would scale every gradient wrongly: both checks above. Call after the
    Trainer has built its Accelerator, in every process."""
    check_single_accumulation_division()
    check_fsdp2_gradient_average()

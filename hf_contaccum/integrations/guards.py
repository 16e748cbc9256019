"""Guards against environments that would train wrongly without a word, each run before training.

CUDA graphs with several backward passes per step, a Trainer that divides the loss by the accumulation
steps twice, FSDP2 on a process group that sums where it should average, GradCache under ZeRO-3.
"""
from __future__ import annotations

import os

import torch

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


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage when accelerate runs DeepSpeed, else None."""
    from accelerate.state import AcceleratorState, DistributedType

    if AcceleratorState._shared_state.get("distributed_type") != DistributedType.DEEPSPEED:
        return None
    return AcceleratorState().deepspeed_plugin.zero_stage


def check_engine_supports_gradcache() -> None:
    if (deepspeed_zero_stage() or 0) >= 3:
        raise ValueError("GradCache (gradcache_chunk_size / mini_batch_size) does not work under DeepSpeed ZeRO-3: "
                         "ZeRO-3 gathers a parameter only inside its own forward and backward hooks, and DeepSpeed's "
                         "partitioning fails when GradCache replays chunks from a backward hook. Use ZeRO-2 "
                         "(accelerate_configs/deepspeed_zero2.yaml), FSDP (fsdp.yaml) or DDP, or turn GradCache off.")

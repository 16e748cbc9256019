"""GradCache (Gao et al. 2021, arXiv 2101.06983) inside ContAccumTrainer.

One micro-batch in three passes: (1) encode it chunk by chunk without a graph, keeping
each chunk's RNG state; (2) compute the contrastive loss (with the bank, across
processes) on the detached vectors and back-propagate to the vectors only; (3) replay
each chunk with its RNG state, so dropout draws the same masks, and back-propagate the
cached vector gradients into the encoder. Activation memory is one chunk's; the price is
the second forward.
"""
from __future__ import annotations

import contextlib

import torch


class _RngState:
    """The CPU and CUDA RNG states at one point, to replay a forward with the same dropout."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restored(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _chunk_inputs(inputs: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of the queries with their positives and hard negatives.

    The collator padded the whole local batch to its longest text; a chunk drops the token
    columns that are padding in all of its rows, so a chunk costs what a micro-batch of the
    same size would (masked positions never change the unmasked outputs)."""
    n, h = inputs["hard_negative_keys"].shape
    passage_rows = list(range(start, stop)) + [n + i * h + j for i in range(start, stop) for j in range(h)]
    index = torch.tensor(passage_rows, device=inputs["passage_input_ids"].device)
    rows = {"query": lambda t: t[start:stop], "passage": lambda t: t.index_select(0, index)}
    out = {}
    for side, take in rows.items():
        mask = take(inputs[f"{side}_attention_mask"])
        used = mask.any(0)  # token columns some row of this chunk uses
        for key in (f"{side}_input_ids", f"{side}_attention_mask", f"{side}_token_type_ids"):
            if key in inputs:
                out[key] = take(inputs[key])[:, used]
    out["passage_keys"] = inputs["passage_keys"][start:stop]
    out["hard_negative_keys"] = inputs["hard_negative_keys"][start:stop]
    return out


def gradcache_training_step(trainer, model, inputs) -> torch.Tensor:
    model.train()
    inputs = trainer._prepare_inputs(inputs)
    n = inputs["query_input_ids"].shape[0]
    size = trainer.args.gradcache_chunk_size
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    chunks = [_chunk_inputs(inputs, a, b) for a, b in bounds]

    # (1) encode without a graph, remembering each chunk's RNG state
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState())
            with trainer.compute_loss_context_manager():
                reps.append(trainer.encode_batch(model, chunk)[:3])  # q, positives, hard negatives
    leaves = [[None if t is None else t.detach().requires_grad_() for t in rep] for rep in reps]
    cat = lambda i: None if leaves[0][i] is None else torch.cat([leaf[i] for leaf in leaves])

    # (2) the loss on the cached vectors, back-propagated to the vectors only (fp32 inside the loss)
    loss = trainer.loss_from_embeddings(cat(0), cat(1), cat(2), inputs, training=True)
    loss = loss / trainer.current_gradient_accumulation_steps  # as Trainer.training_step does
    loss.backward()

    # (3) replay each chunk with its RNG state and push the cached gradients into the encoder;
    # under DDP only the last chunk synchronises gradients
    for i, (chunk, state, leaf) in enumerate(zip(chunks, states, leaves)):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
        with sync, state.restored(), trainer.compute_loss_context_manager():
            rep = trainer.encode_batch(model, chunk)[:3]
            surrogate = sum((r.float() * l.grad.float()).sum() for r, l in zip(rep, leaf) if r is not None)
        trainer.accelerator.backward(surrogate)
    return loss.detach()

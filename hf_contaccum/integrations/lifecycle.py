"""ContAccumCallback: the one step lifecycle of ContAccumTrainer and SentenceTransformerTrainer.

At each optimizer step: the staleness controls are told a step begins; before the optimizer, the loss
and the gradients are checked finite; at the step's end, the collapse guard, the reset ablation, and,
when the Trainer is about to save, the banks, written before the Trainer's own files (so a checkpoint
with trainer_state.json, its last file, has them). Before training: the environment guards and, when
resuming, the banks of the checkpoint the Trainer resumed from, each checked against the run.
"""
from __future__ import annotations

import logging
import os

from transformers import DefaultFlowCallback, TrainerCallback

from ..core.checkpoint import (
    bank_file,
    fingerprint,
    is_torn,
    latest_checkpoint,
    load_bank,
    save_bank,
)
from .guards import check_cuda_graphs, check_gradient_scale, deepspeed_zero_stage

logger = logging.getLogger(__name__)


def resolve_resume(output_dir: str, resume) -> str | None:
    """The checkpoint folder `trainer.train(resume_from_checkpoint=resume)` should load: True (or "latest") is the
    newest complete checkpoint in output_dir, torn ones skipped with a warning; a path must be complete."""
    if resume in (None, False):
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        torn = sorted(e for e in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                      if e.startswith("checkpoint-") and is_torn(os.path.join(output_dir, e)))
        latest = latest_checkpoint(output_dir)
        if torn:
            logger.warning("skipping torn checkpoint(s) %s in %s (trainer_state.json missing or cut short: the "
                           "process was stopped while writing them); resuming from %s", ", ".join(torn), output_dir,
                           latest)
        if latest is None:
            raise ValueError(f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint"
                             f"{' (only torn ones: ' + ', '.join(torn) + ')' if torn else ''}")
        return latest
    if is_torn(resume):
        raise ValueError(f"{resume} is a torn checkpoint: {os.path.join(resume, 'trainer_state.json')} is missing or "
                         "cut short (the process was stopped while writing it). Resume from an earlier checkpoint, or "
                         "pass resume_from_checkpoint=True for the newest complete one")
    return resume


class ContAccumCallback(TrainerCallback):
    """The lifecycle of one or more ContAccum losses in a transformers Trainer (any subclass).

    losses: a function returning {name: ContAccumLoss} (the core losses; "" names the only one), asked at
    train begin, since a loss may build its banks late. gradcaches: the GradCache objects in use."""

    def __init__(self, losses, gradcaches=()):
        self._losses, self.gradcaches = losses, tuple(gradcaches)
        self.resumed_from = None  # set by the trainer's train(): the checkpoint it resumes from
        self._saved_step = None

    @property
    def losses(self) -> dict:
        return self._losses()

    def attach(self, trainer) -> ContAccumCallback:
        """Add to `trainer` right after DefaultFlowCallback: at a step's end `control.should_save` is then decided,
        and at a log line the bank statistics reach the printer and the reporting integrations."""
        callbacks = trainer.callback_handler.callbacks
        if any(c is self for c in callbacks):
            return self
        flow = next((i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), -1)
        callbacks.insert(flow + 1, self)
        return self

    # -- before training -------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_cuda_graphs(args, gradcache=bool(self.gradcaches))
        check_gradient_scale()
        zero = deepspeed_zero_stage()
        for gradcache in self.gradcaches:
            gradcache.accumulate_once = zero is not None
        for loss in self.losses.values():
            if zero is None:  # DeepSpeed applies the step inside the last backward: checked per micro-batch there
                loss.defer_finite_check_to_step()
        if state.global_step > 0:
            self._restore(args, state, model)

    def _restore(self, args, state, model) -> None:
        folder = self.resumed_from or (args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str)
                                       else os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        model_print = fingerprint(model) if model is not None else None
        for name, loss in self.losses.items():
            if loss.memory_bank_size == 0 and not os.path.exists(bank_file(folder, name, args.process_index)):
                continue
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"resuming at step {state.global_step}, but {folder} does not exist, so the "
                                        "memory bank cannot be restored: pass the checkpoint to "
                                        "trainer.train(resume_from_checkpoint=...)")
            load_bank(loss, folder, name=name, rank=args.process_index, processes=args.world_size,
                      step=state.global_step, model_fingerprint=model_print)

    # -- every step --------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        for loss in self.losses.values():
            loss.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        last_good = latest_checkpoint(args.output_dir)
        for i, loss in enumerate(self.losses.values()):
            loss.check_finite(model if i == 0 else None, last_good)
        towers = [getattr(model, name, None) for name in ("query_encoder", "passage_encoder")]
        if None not in towers and towers[0] is not towers[1] and self.losses:
            _record_tower_ratio(next(iter(self.losses.values())), *towers)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for loss in self.losses.values():
            loss.check_collapse(loss.settings.collapse_patience)  # before the step's checkpoint
            if loss.settings.reset_bank_each_step:
                loss.reset()
        if control.should_save:
            self._save(args, state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self._save(args, state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model)  # a save decided after the step's end (save_strategy="best"): only now

    def _save(self, args, state, model) -> None:
        if self._saved_step == state.global_step:
            return
        self._saved_step = state.global_step
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        model_print = fingerprint(model) if model is not None else None
        for name, loss in self.losses.items():
            if loss.memory_bank_size:
                save_bank(loss, folder, name=name, rank=args.process_index, processes=args.world_size,
                          step=state.global_step, model_fingerprint=model_print)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        losses = self.losses
        for name, loss in losses.items():
            stats = loss.pop_log_stats()
            prefix = f"{name}_" if name and len(losses) > 1 else ""
            logs.update({prefix + key: value for key, value in stats.items()})
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k not in state.log_history[-1]})


def _record_tower_ratio(loss, query_tower, passage_tower) -> None:
    """The paper's GradNormRatio for separate towers: the passage tower's parameter-gradient norm over the query
    tower's, after clipping (which scales both alike), summed on the device."""
    import torch

    def norm(tower):
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    query, passage = norm(query_tower), norm(passage_tower)
    if query is not None and passage is not None:
        loss.diagnostics.add_ratio("towers", query, passage)

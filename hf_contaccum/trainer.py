"""ContAccumTrainer: transformers.Trainer with the ContAccum loss and dual memory bank.

The micro-step (gather, loss, bank, enqueue) belongs to ContAccumLoss and GradCache to
its wrapper; the Trainer's own training_step runs them unchanged. What stays here is what
the Trainer needs: compute_loss, the bank in checkpoints, evaluation, logging, the card.
"""
from __future__ import annotations

import logging
import os

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from .data import ContrastiveCollator, side_features, split_passages, tokenize_once
from .gradcache import GradCache, check_engine_supports_gradcache
from .loss import BANK_FILE, ContAccumLoss, check_bank_fits
from .model_card import build_model_card
from .training_args import (
    ContAccumTrainingArguments,
    check_gradient_scale,
)
from .validation import check_dataset, checked_stream

logger = logging.getLogger(__name__)


def _warn_about_size(num_rows: int, pairs_per_step: int, bank_size: int) -> None:
    if num_rows < pairs_per_step:
        logger.warning("train_dataset has %d rows, fewer than one optimizer step takes (%d pairs: batch size x "
                       "gradient_accumulation_steps x processes): every step repeats or runs short; use more data "
                       "or a smaller batch", num_rows, pairs_per_step)
    if bank_size > num_rows:
        logger.warning("memory_bank_size %d is larger than train_dataset (%d rows): the bank holds every pair, "
                       "repeats included, and its oldest entries come from the oldest encoder; a bank of about "
                       "one optimizer step's pairs is the measured default", bank_size, num_rows)


class _LossStepHooks(TrainerCallback):
    """Tells the loss each optimizer step (the bank warm-up), stops training on a non-finite loss before
    the optimizer applies the step, and when the embeddings collapse, at the end of the step: before any
    checkpoint of it."""

    def __init__(self, loss: ContAccumLoss, patience: int):
        self.loss, self.patience = loss, patience

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss.defer_finite_check_to_step()  # on_pre_optimizer_step below reads it

    def on_step_begin(self, args, state, control, **kwargs):
        self.loss.start_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.loss.check_finite()  # a non-finite micro-batch: stop before the step is applied

    def on_step_end(self, args, state, control, **kwargs):
        self.loss.check_collapse(self.patience)


class _TowerGradNorms(TrainerCallback):
    """The paper's GradNormRatio for separate towers: the passage tower's parameter-gradient norm over the
    query tower's, at every optimizer step (after clipping, which scales both alike), summed on the device."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        def norm(tower):
            grads = [p.grad.float().pow(2).sum() for p in tower.parameters() if p.grad is not None]
            return torch.stack(grads).sum().sqrt() if grads else None

        query, passage = norm(model.query_encoder), norm(model.passage_encoder)
        if query is not None and passage is not None:
            self.sum = self.sum + passage / query.clamp(min=1e-30)
            self.count += 1

    def pop(self) -> dict:
        if not self.count:
            return {}
        value, self.sum, self.count = float(self.sum) / self.count, 0.0, 0
        return {"grad_norm_ratio_towers": value}


class _ResetBankEachStep(TrainerCallback):
    """reset_bank_each_step: empty the bank after every optimizer step (an ablation)."""

    def __init__(self, loss: ContAccumLoss):
        self.loss = loss

    def on_step_end(self, args, state, control, **kwargs):
        self.loss.reset()


class ContAccumTrainer(Trainer):
    """Trainer for dual encoders with Contrastive Accumulation (Kim et al., NeurIPS 2024).

    compute_loss returns the mean InfoNCE of one micro-batch over current and banked rows;
    the Trainer divides it by the accumulation steps once (loss_is_scaled_for_ga=False),
    which is the paper's 1/K of eq. 4. The micro-batch joins the bank as soon as its
    backward has run, so the next micro-batch of the same accumulation window sees it.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: ContAccumTrainingArguments = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, evaluator=None, **kwargs):
        if args is None:
            args = ContAccumTrainingArguments(output_dir="contaccum_output")
        if not isinstance(args, ContAccumTrainingArguments):
            raise TypeError("ContAccumTrainer needs ContAccumTrainingArguments (a TrainingArguments subclass)")
        # the data is checked once, before anything is built (an IterableDataset: row by row as it streams);
        # with a collator of your own, the data is in your format and yours to check
        data_check = None
        if train_dataset is not None and data_collator is None and not isinstance(train_dataset, dict):
            data_check = check_dataset(train_dataset, "train_dataset", args.max_hard_negatives)
            if data_check.num_rows is None:
                train_dataset = checked_stream(train_dataset, "train_dataset", args.max_hard_negatives)
        if eval_dataset is not None and data_collator is None and not isinstance(eval_dataset, dict):
            check_dataset(eval_dataset, "eval_dataset", args.max_hard_negatives)
        if data_collator is None:
            tokenizer = processing_class if processing_class is not None else getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("the model has no tokenizer: pass processing_class=<tokenizer> (or a data_collator) "
                                 "to ContAccumTrainer, or build the model with BiEncoder.from_encoder(...)")
            data_collator = ContrastiveCollator(tokenizer, args.query_max_length, args.passage_max_length,
                                                args.max_hard_negatives,
                                                prompts=getattr(getattr(model, "config", None), "prompts", None),
                                                pad_to_multiple_of=args.pad_to_multiple_of)
            processing_class = tokenizer
            if args.tokenize_once:  # a step then only pads; an IterableDataset is tokenised as it streams
                if isinstance(train_dataset, datasets.Dataset):
                    train_dataset = tokenize_once(train_dataset, data_collator, "train_dataset")
                if isinstance(eval_dataset, datasets.Dataset):
                    eval_dataset = tokenize_once(eval_dataset, data_collator, "eval_dataset")
        # Trainer refuses eval_strategy without an eval_dataset; a retrieval evaluator is enough for us.
        eval_strategy = args.eval_strategy
        if evaluator is not None and eval_dataset is None:
            args.eval_strategy = "no"
        try:
            super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        finally:
            args.eval_strategy = eval_strategy
        self.evaluator = evaluator
        check_gradient_scale()
        gathered = self.accelerator.num_processes if args.gather_across_devices else 1
        if gathered > 1 and not self.accelerator.even_batches:
            # a rank that runs out of batches would leave the others waiting in the gather forever
            raise ValueError("gather_across_devices needs accelerate's even_batches=True (the default): with uneven "
                             "batches a process waits forever for the others' micro-batch")
        if args.gradcache_chunk_size:
            check_engine_supports_gradcache()
        check_bank_fits(args.passage_bank_size, args.per_device_train_batch_size, gathered)  # before training
        micro_batch = args.per_device_train_batch_size * gathered
        self.num_hard_negatives = data_check.num_hard_negatives if data_check is not None else None
        if data_check is not None and data_check.num_rows is not None:
            _warn_about_size(data_check.num_rows, micro_batch * args.gradient_accumulation_steps,
                             args.passage_bank_size)
        self.contrastive_loss = ContAccumLoss(
            args.passage_bank_size, args.temperature, args.similarity, query_bank_size=args.query_bank_size,
            bank_hard_negatives=args.bank_hard_negatives, mask_false_negatives=args.mask_false_negatives,
            gather_across_devices=args.gather_across_devices, bank_chunk_size=args.bank_chunk_size,
            bank_weight=args.bank_weight, bank_warmup_steps=args.bank_warmup_steps)
        self.gradcache = GradCache(args.gradcache_chunk_size, paired=True) if args.gradcache_chunk_size else None
        config = getattr(self.model, "config", None)
        if args.one_tower_call and getattr(config, "shared", None) is not True:
            raise ValueError("one_tower_call=True needs a BiEncoder with one shared tower (shared=True): separate "
                             "query and passage towers are two calls anyway. Set one_tower_call=False.")
        if config is not None and hasattr(config, "similarity"):
            config.similarity = args.similarity  # the saved model then says how it is scored
        self.add_callback(_LossStepHooks(self.contrastive_loss, args.collapse_patience))
        self.refreshed_at_step = None  # bank_refresh_steps / bank_drift_probe: the step whose start updated the bank
        self.tower_grad_norms = None
        if config is not None and getattr(config, "shared", True) is False:
            self.tower_grad_norms = _TowerGradNorms()
            self.add_callback(self.tower_grad_norms)
        if args.reset_bank_each_step:
            self.add_callback(_ResetBankEachStep(self.contrastive_loss))

    @property
    def memory_bank(self):
        return self.contrastive_loss.bank

    # -- loss ------------------------------------------------------------------------
    def embed(self, model, features: dict) -> dict:
        """{side: tokenised texts} -> {side: embeddings} in one forward call ("query", "passage").
        The hook to override to post-process embeddings (see examples/subclass_truncated_embeddings.py)."""
        inputs = {f"{side}_{key}": value for side, feats in features.items() for key, value in feats.items()}
        if self.args.one_tower_call and len(features) == 2:
            inputs["one_tower_call"] = True
        out = model(**inputs)
        return {side: out[f"{side}_embeddings"] for side in features}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.contrastive_loss.train(model.training)
        columns = {side: side_features(inputs, side) for side in ("query", "passage")}
        if (self.args.bank_refresh_steps or self.args.bank_drift_probe) and model.training and torch.is_grad_enabled():
            self._update_bank_before_step(model, columns, inputs["query_input_ids"].shape[0])

        def loss_from_embeddings(embeddings):
            positives, hard_negatives = split_passages(embeddings["passage"], inputs["hard_negative_keys"])
            return self.contrastive_loss(embeddings["query"], positives, inputs["passage_keys"], hard_negatives,
                                         inputs["hard_negative_keys"])

        if self.gradcache is not None and model.training and torch.is_grad_enabled():
            loss = self.gradcache(model, columns, self.embed, loss_from_embeddings)
        else:
            loss = loss_from_embeddings(self.embed(model, columns))
        return (loss, {}) if return_outputs else loss

    def _update_bank_before_step(self, model, columns: dict, n: int) -> None:
        """bank_refresh_steps / bank_drift_probe: at a step's first micro-batch re-encode the bank (or the probe and
        move the bank), and keep the tokens they need (passages: the n positives)."""
        loss, step, args = self.contrastive_loss, self.state.global_step, self.args
        loss.move_bank_to(columns["query"]["input_ids"].device)  # a resumed bank starts on the CPU
        tokens = {side: {key: columns[side][key][:n] for key in ("input_ids", "attention_mask")} for side in columns}
        if args.bank_drift_probe:
            loss.keep_drift_probe(tokens, args.bank_drift_probe)
        if step % (args.bank_refresh_steps or 1) == 0 and self.refreshed_at_step != step:  # a step's first micro-batch
            self.refreshed_at_step = step
            if args.bank_refresh_steps:
                self.refresh_bank(model)
            else:
                loss.correct_drift(self._pair_encoder(model), model)
        if args.bank_refresh_steps:
            loss.keep_tokens(tokens)

    def refresh_bank(self, model=None, block: int = 256) -> None:
        """Encode every banked pair again with the current encoder (bank_refresh_steps), through `embed`, in the
        model's current mode (training: dropout as for the micro-batch's own rows)."""
        self.contrastive_loss.refresh_bank(self._pair_encoder(model if model is not None else self.model), block)

    def _pair_encoder(self, model):
        """{"query": features, "passage": features} -> (query vectors, passage vectors), through `embed`."""
        def encode(features):
            embeddings = self.embed(model, features)
            return embeddings["query"], embeddings["passage"]
        return encode

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss is plain in-batch InfoNCE: evaluation never reads or writes the bank."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- evaluation: one evaluate() = one log line and one on_evaluate, with every metric ----
    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is None and self.eval_dataset is None and self.evaluator is not None:
            # the retrieval evaluator alone: no eval loss. Its own generator, so that iterating it does not
            # draw from the global RNG (evaluating before train() then leaves the training run unchanged)
            return DataLoader([], generator=torch.Generator())
        return super().get_eval_dataloader(eval_dataset)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.evaluator is not None:
            model = self.accelerator.unwrap_model(self.model)
            retrieval = self.evaluator(model, self.processing_class)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in retrieval.items()})
        return output

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs.update(self.contrastive_loss.pop_log_stats())
            if self.tower_grad_norms is not None:
                logs.update(self.tower_grad_norms.pop())
        super().log(logs, start_time)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        """README.md with the ContAccum settings, GradNormRatio, evaluation, usage and citations."""
        if not self.is_world_process_zero():
            return
        dataset_names = [dataset] if isinstance(dataset, str) else dataset
        card = build_model_card(self, model_name=model_name, base_model=finetuned_from, datasets=dataset_names,
                                language=language, license=license, tags=[tags] if isinstance(tags, str) else tags)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    # -- checkpoints: the bank travels with the optimizer state, before trainer_state.json and any push ----
    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if output_dir is not None:
            self.contrastive_loss.save_checkpoint(output_dir, self.args.process_index,
                                                  global_step=self.state.global_step)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        bank_file = os.path.join(checkpoint, BANK_FILE.format(rank=self.args.process_index))
        if self.contrastive_loss.memory_bank_size or os.path.exists(bank_file):
            self.contrastive_loss.load_checkpoint(checkpoint, self.args.process_index)

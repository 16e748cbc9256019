"""ContAccumTrainer: transformers.Trainer with the ContAccum loss and its memory bank.

The micro-step (gather, loss, bank, enqueue) is ContAccumLoss's, GradCache its wrapper's, the step
lifecycle (checks, checkpoints, logs) ContAccumCallback's; the Trainer's own training_step runs them
unchanged. What stays here is glue: the data, compute_loss, evaluation, the card.
"""
from __future__ import annotations

import logging
import os

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ..core.bank import bank_bytes
from ..core.gradcache import GradCache
from ..core.loss import ContAccumLoss, check_bank_fits
from ..core.memory import check_fits
from ..data.collator import (
    ContrastiveCollator,
    side_features,
    split_passages,
    tokenize_once,
)
from ..data.validation import check_dataset, checked_stream
from ..model.card import build_model_card
from .guards import check_engine_supports_gradcache, check_gradient_scale
from .lifecycle import ContAccumCallback, resolve_resume
from .training_args import ContAccumTrainingArguments

logger = logging.getLogger(__name__)


class ContAccumTrainer(Trainer):
    """Trainer for dual encoders with Contrastive Accumulation (Kim et al., NeurIPS 2024).

    compute_loss returns the mean InfoNCE of one micro-batch over current and banked rows; the Trainer divides it
    by the accumulation steps once (loss_is_scaled_for_ga=False), the paper's 1/K. The micro-batch joins the bank
    as soon as its backward has run, so the next micro-batch of the same step already sees it."""

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: ContAccumTrainingArguments = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, evaluator=None, **kwargs):
        if args is None:
            args = ContAccumTrainingArguments(output_dir="contaccum_output")
        if not isinstance(args, ContAccumTrainingArguments):
            raise TypeError("ContAccumTrainer needs ContAccumTrainingArguments (a TrainingArguments subclass)")
        # checked once, before anything is built (a stream: row by row as it streams); with a collator of your own
        # the data is in your format and yours to check
        data_check = None
        if train_dataset is not None and data_collator is None and not isinstance(train_dataset, dict):
            data_check = check_dataset(train_dataset, "train_dataset", args.max_hard_negatives)
            if data_check.num_rows is None:
                train_dataset = checked_stream(train_dataset, "train_dataset", args.max_hard_negatives)
        if eval_dataset is not None and data_collator is None and not isinstance(eval_dataset, dict):
            check_dataset(eval_dataset, "eval_dataset", args.max_hard_negatives)
        if data_collator is None:
            processing_class = processing_class if processing_class is not None else getattr(model, "tokenizer", None)
            if processing_class is None:
                raise ValueError("the model has no tokenizer: pass processing_class=<tokenizer> (or a data_collator) "
                                 "to ContAccumTrainer, or build the model with BiEncoder.from_encoder(...)")
            data_collator = ContrastiveCollator(processing_class, args.query_max_length, args.passage_max_length,
                                                args.max_hard_negatives,
                                                prompts=getattr(getattr(model, "config", None), "prompts", None),
                                                pad_to_multiple_of=args.pad_to_multiple_of)
            if args.tokenize_once:  # a step then only pads; a stream is tokenised as it streams
                train_dataset, eval_dataset = (tokenize_once(ds, data_collator, name)
                                               if isinstance(ds, datasets.Dataset) else ds for ds, name in
                                               ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")))
        eval_strategy = args.eval_strategy  # the Trainer refuses eval_strategy without an eval_dataset
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
            raise ValueError("gather_across_devices needs accelerate's even_batches=True (the default): with uneven "
                             "batches a process waits forever for the others' micro-batch")
        if args.gradcache_chunk_size:
            check_engine_supports_gradcache()
        check_bank_fits(args.memory_bank_size, args.per_device_train_batch_size, gathered)
        width = (getattr(getattr(model, "config", None), "encoder_config", None) or {}).get("hidden_size")
        if width and args.memory_bank_size:  # the bank's memory, before anything trains (its allocation checks again)
            banked = (data_check.num_hard_negatives or 0) if data_check is not None and args.bank_hard_negatives else 0
            check_fits(bank_bytes(args.memory_bank_size, width, banked), args.device,
                       f"memory_bank_size={args.memory_bank_size} (vectors of width {width})")
        self.num_hard_negatives = data_check.num_hard_negatives if data_check is not None else None
        if data_check is not None and data_check.num_rows is not None:
            _warn_about_size(data_check.num_rows, args.per_device_train_batch_size * gathered *
                             args.gradient_accumulation_steps, args.memory_bank_size)
        self.contrastive_loss = ContAccumLoss(settings=args.contaccum_settings())
        self.gradcache = GradCache(args.gradcache_chunk_size, paired=True) if args.gradcache_chunk_size else None
        config = getattr(self.model, "config", None)
        if args.one_tower_call and getattr(config, "shared", None) is not True:
            raise ValueError("one_tower_call=True needs a BiEncoder with one shared tower (shared=True): separate "
                             "query and passage towers are two calls anyway. Set one_tower_call=False.")
        if config is not None and hasattr(config, "similarity"):  # the saved model then says how it was trained
            config.similarity = args.similarity
            config.query_max_length, config.passage_max_length = args.query_max_length, args.passage_max_length
            for name in ("eos_token_id", "bos_token_id", "pad_token_id"):  # the tokenizer's: what the Trainer would
                if getattr(self.processing_class, name, None) is not None:  # align, with a notice, at train()
                    setattr(config, name, getattr(self.processing_class, name))
        self.lifecycle = ContAccumCallback(lambda: {"": self.contrastive_loss},
                                           [self.gradcache] if self.gradcache else []).attach(self)

    @property
    def memory_bank(self):
        return self.contrastive_loss.bank

    def train(self, resume_from_checkpoint=None, **kwargs):
        """transformers' train(); resume_from_checkpoint=True (or "latest") skips torn checkpoints, naming them."""
        resume = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        self.lifecycle.resumed_from = resume
        return super().train(resume_from_checkpoint=resume, **kwargs)

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
        loss_fn = self.contrastive_loss
        loss_fn.train(model.training)
        training = model.training and torch.is_grad_enabled()
        columns = {side: side_features(inputs, side) for side in ("query", "passage")}
        if training and loss_fn.staleness.active:  # the positives only: passages[:n]
            n = inputs["query_input_ids"].shape[0]
            tokens = {side: {key: columns[side][key][:n] for key in ("input_ids", "attention_mask")}
                      for side in columns}
            loss_fn.before_micro_batch(tokens, self._pair_encoder(model), model)

        def loss_from_embeddings(embeddings):
            positives, hard_negatives = split_passages(embeddings["passage"], inputs["hard_negative_keys"])
            return loss_fn(embeddings["query"], positives, inputs["passage_keys"], hard_negatives,
                           inputs["hard_negative_keys"])

        if self.gradcache is not None and training:
            loss = self.gradcache(model, columns, self.embed, loss_from_embeddings)
        else:
            loss = loss_from_embeddings(self.embed(model, columns))
        return (loss, {}) if return_outputs else loss

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
            # the retrieval evaluator alone: no eval loss. Its own generator, so that iterating it does not draw
            # from the global RNG (evaluating before train() then leaves the training run unchanged)
            return DataLoader([], generator=torch.Generator())
        return super().get_eval_dataloader(eval_dataset)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.evaluator is not None:
            retrieval = self.evaluator(self.accelerator.unwrap_model(self.model), self.processing_class)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in retrieval.items()})
        return output

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        """README.md with the ContAccum settings, GradNormRatio, evaluation, usage and citations."""
        if not self.is_world_process_zero():
            return
        card = build_model_card(self, model_name=model_name, base_model=finetuned_from,
                                datasets=[dataset] if isinstance(dataset, str) else dataset, language=language,
                                license=license, tags=[tags] if isinstance(tags, str) else tags)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


def _warn_about_size(num_rows: int, pairs_per_step: int, bank_size: int) -> None:
    if num_rows < pairs_per_step:
        logger.warning("train_dataset has %d rows, fewer than one optimizer step takes (%d pairs: batch size x "
                       "gradient_accumulation_steps x processes): every step repeats or runs short; use more data "
                       "or a smaller batch", num_rows, pairs_per_step)
    if bank_size > num_rows:
        logger.warning("memory_bank_size %d is larger than train_dataset (%d rows): the bank holds every pair, "
                       "repeats included, and its oldest entries come from the oldest encoder; 'auto' (the pairs "
                       "of one optimizer step) is the default", bank_size, num_rows)

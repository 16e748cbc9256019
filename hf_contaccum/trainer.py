"""ContAccumTrainer: transformers.Trainer with the ContAccum loss and dual memory bank."""
from __future__ import annotations

import os

import torch
import torch.distributed._functional_collectives as collectives
import torch.distributed.nn.functional
from accelerate.utils import gather as gather_without_grad
from transformers import Trainer

from .data import ColumnMap, ContrastiveCollator
from .gradcache import gradcache_training_step
from .loss import ContAccumLoss
from .model_card import build_model_card
from .training_args import ContAccumTrainingArguments

BANK_FILE = "contaccum_bank_rank{rank}.pt"
MODEL_INPUTS = ("query_input_ids", "query_attention_mask", "query_token_type_ids",
                "passage_input_ids", "passage_attention_mask", "passage_token_type_ids")


def gather_with_grad(t):
    """Concatenate every rank's `t` along dim 0, keeping autograd: the backward sums each rank's
    gradient back to the owner. torch's successor of the deprecated torch.distributed.nn all_gather."""
    if hasattr(collectives, "all_gather_single_autograd"):
        return collectives.all_gather_single_autograd(t.contiguous(), 0, torch.distributed.group.WORLD)
    return torch.cat(torch.distributed.nn.functional.all_gather(t))


class ContAccumTrainer(Trainer):
    """Trainer for dual encoders with Contrastive Accumulation (Kim et al., NeurIPS 2024).

    compute_loss returns the mean InfoNCE of one micro-batch over current and banked rows;
    the Trainer divides it by the accumulation steps once (loss_is_scaled_for_ga=False),
    which is the paper's 1/K of eq. 4. The micro-batch is enqueued after its backward, so
    the next micro-batch of the same accumulation window already sees it.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args: ContAccumTrainingArguments = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, evaluator=None, **kwargs):
        if args is None:
            args = ContAccumTrainingArguments(output_dir="contaccum_output")
        if not isinstance(args, ContAccumTrainingArguments):
            raise TypeError("ContAccumTrainer needs ContAccumTrainingArguments (a TrainingArguments subclass)")
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is not None and getattr(ds, "column_names", None) is not None and not isinstance(ds, dict):
                try:
                    ColumnMap.from_columns(ds.column_names)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        if data_collator is None:
            tokenizer = processing_class if processing_class is not None else getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("pass processing_class=<tokenizer> (or a data_collator) to ContAccumTrainer")
            data_collator = ContrastiveCollator(tokenizer, args.query_max_length, args.passage_max_length,
                                                args.max_hard_negatives)
            processing_class = tokenizer
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
        if self.accelerator.num_processes > 1 and args.gather_across_devices and not self.accelerator.even_batches:
            # a rank that runs out of batches would leave the others waiting in the gather forever
            raise ValueError("gather_across_devices needs accelerate's even_batches=True (the default): with uneven "
                             "batches a process waits forever for the others' micro-batch")
        if args.gradcache_chunk_size and self.accelerator.distributed_type == "DEEPSPEED":
            raise ValueError("gradcache_chunk_size is not supported under DeepSpeed, whose engine owns the backward; "
                             "use DDP or FSDP, or turn GradCache off")
        self.contrastive_loss = ContAccumLoss(
            args.query_bank_size, args.passage_bank_size, args.temperature, args.similarity,
            bank_hard_negatives=args.bank_hard_negatives, mask_false_negatives=args.mask_false_negatives,
            chunk_size=args.bank_chunk_size)
        self._pending_enqueue = None
        self._log_sums = {}

    @property
    def memory_bank(self):
        return self.contrastive_loss.bank

    # -- loss ------------------------------------------------------------------------
    def encode_batch(self, model, inputs):
        """Run both towers once; split passages into positives (n, d) and hard negatives (n, H, d)."""
        out = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        q, passages = out.query_embeddings, out.passage_embeddings
        n, h = q.shape[0], inputs["hard_negative_keys"].shape[1]
        hard_negatives = passages[n:].view(n, h, -1) if h else None
        return q, passages[:n], hard_negatives, out

    def _gather(self, q, p, pk, hn, hk):
        """Share the micro-batch across processes: passages WITH gradient (all_gather's backward
        sums every rank's gradient back to the owner), queries and keys without (for the bank)."""
        sizes = gather_without_grad(torch.tensor([[q.shape[0], hk.shape[1]]], device=q.device)).tolist()
        if any(s != sizes[0] for s in sizes):
            raise ValueError(
                f"micro-batches differ across processes (per rank [batch size, hard negatives]: {sizes}); the "
                "gathered similarity matrix needs equal shapes. Keep accelerate's even_batches (default) or set "
                "dataloader_drop_last=True, and give every row the same number of hard negatives")
        p_all = gather_with_grad(p)
        hn_all = gather_with_grad(hn) if hn is not None else None
        return gather_without_grad(q.detach()), p_all, gather_without_grad(pk), hn_all, gather_without_grad(hk)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q, p, hn, out = self.encode_batch(model, inputs)
        loss = self.loss_from_embeddings(q, p, hn, inputs, training=model.training)
        return (loss, out) if return_outputs else loss

    def loss_from_embeddings(self, q, p, hn, inputs, training=True):
        """The contrastive loss of one micro-batch's vectors (gathered across processes when
        training with several), queued for the bank once the backward has run."""
        pk, hk = inputs["passage_keys"], inputs["hard_negative_keys"]
        world = self.accelerator.num_processes if self.args.gather_across_devices else 1
        q_bank, p_all, pk_all, hn_all, hk_all = q.detach(), p, pk, hn, hk
        if training and world > 1:
            q_bank, p_all, pk_all, hn_all, hk_all = self._gather(q, p, pk, hn, hk)
        else:
            world = 1  # evaluation: plain local in-batch loss
        rank = self.accelerator.process_index if world > 1 else 0
        loss, stats = self.contrastive_loss(q, p_all, pk_all, hn_all, hk_all, use_bank=training, rank=rank,
                                            world_size=world)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"contrastive loss is {loss.item()} at step {self.state.global_step}; stopped before applying it, so "
                "the last checkpoint is intact. Usual fixes: lower learning_rate, use similarity='cos' or a larger "
                "temperature with dot product, bf16 instead of fp16, and check the data for broken texts.")
        if training and torch.is_grad_enabled():
            self._track(q, p, hn, stats)
            # every rank enqueues the same gathered micro-batch in rank order: one identical global bank
            self._pending_enqueue = (q_bank, p_all.detach(), pk_all, None if hn_all is None else hn_all.detach(),
                                     hk_all)
        return loss

    def _track(self, q, p, hn, stats):
        """Sum loss-side statistics and, through gradient hooks, the GradNormRatio (paper §5.5)."""
        sums = self._log_sums
        sums["micro_batches"] = sums.get("micro_batches", 0) + 1
        sums["negatives_per_query"] = sums.get("negatives_per_query", 0) + stats.num_columns - 1
        side = {}

        def hook(name):
            def record(grad):
                side[name] = side.get(name, 0.0) + float(grad.float().pow(2).sum())
                if len(side) == (3 if hn is not None else 2):
                    passage = (side["p"] + side.get("hn", 0.0)) ** 0.5
                    query = side["q"] ** 0.5
                    if query > 0:
                        sums["grad_norm_ratio"] = sums.get("grad_norm_ratio", 0.0) + passage / query
                        sums["ratio_count"] = sums.get("ratio_count", 0) + 1
            return record

        if q.requires_grad:
            q.register_hook(hook("q"))
            p.register_hook(hook("p"))
            if hn is not None:
                hn.register_hook(hook("hn"))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradcache_chunk_size:
            loss = gradcache_training_step(self, model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        # Enqueue only now: the backward above still needed the bank as it was.
        if self._pending_enqueue is not None:
            self.contrastive_loss.enqueue(*self._pending_enqueue)
            self._pending_enqueue = None
            self._log_sums["bank_fill"] = len(self.memory_bank)
        if self.args.reset_bank_each_step and self.accelerator.sync_gradients:
            self.contrastive_loss.reset()
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss is plain in-batch InfoNCE: evaluation never reads or writes the bank."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Eval loss (if there is an eval dataset) plus the retrieval evaluator's metrics."""
        metrics = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.evaluator is not None:
            model = self.accelerator.unwrap_model(self.model)
            retrieval = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(model, self.processing_class).items()}
            self.log(retrieval)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, retrieval)
            metrics.update(retrieval)
        return metrics

    def log(self, logs, start_time=None):
        sums = self._log_sums
        if "loss" in logs and sums.get("micro_batches"):
            logs["bank_fill"] = sums["bank_fill"]
            logs["negatives_per_query"] = sums["negatives_per_query"] / sums["micro_batches"]
            if sums.get("ratio_count"):
                logs["grad_norm_ratio"] = sums["grad_norm_ratio"] / sums["ratio_count"]
            self._log_sums = {}
        super().log(logs, start_time)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs):
        """README.md with the ContAccum settings, GradNormRatio, evaluation, usage and citations."""
        if not self.is_world_process_zero():
            return
        datasets = [dataset] if isinstance(dataset, str) else dataset
        card = build_model_card(self, model_name=model_name, base_model=finetuned_from, datasets=datasets,
                                language=language, license=license, tags=[tags] if isinstance(tags, str) else tags)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    # -- checkpoints: the bank travels with the optimizer state -------------------------
    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.contrastive_loss.state_dict(),
                       os.path.join(output_dir, BANK_FILE.format(rank=self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BANK_FILE.format(rank=self.args.process_index))
        if not os.path.exists(path):
            if self.contrastive_loss.bank.capacity:
                raise FileNotFoundError(f"{path} is missing: this checkpoint has no memory bank state, so the run "
                                        "cannot continue exactly; resume from a checkpoint written by ContAccumTrainer")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.contrastive_loss.load_state_dict(state, device=self.args.device)

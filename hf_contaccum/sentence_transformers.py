"""ContAccum as a loss for sentence-transformers' SentenceTransformerTrainer.

    from hf_contaccum.sentence_transformers import ContAccumBankCallback, ContAccumLoss

    loss = ContAccumLoss(model, memory_bank_size=128)          # + mini_batch_size=8 for GradCache
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss,
                                         callbacks=[ContAccumBankCallback(loss)])   # bank in checkpoints

Columns follow sentence-transformers' convention: (anchor, positive) pairs or
(anchor, positive, negative_1, ..., negative_n) tuples. The micro-step (gather, bank,
enqueue) is hf_contaccum.loss.ContAccumLoss; GradCache is hf_contaccum.gradcache.GradCache.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from sentence_transformers.util import cos_sim, dot_score
from torch import nn
from transformers import TrainerCallback

from . import loss as core
from .gradcache import GradCache
from .model_card import CONTACCUM_BIBTEX, GRADCACHE_BIBTEX
from .training_args import check_cuda_graphs, check_gradient_scale

try:  # sentence-transformers >= 6.1: one forward for the candidate columns, as its own losses do
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError:  # older: one forward per column
    def embed_columns(model, features_list):
        return [model(features)["sentence_embedding"] for features in features_list]

logger = logging.getLogger(__name__)
SIMILARITIES = {cos_sim: "cos", dot_score: "dot"}
_PRIMES = (2_147_483_647, 2_147_483_629)  # two 31-bit moduli: a text's key is 62 bits, no int64 overflow


@functools.lru_cache(maxsize=64)
def _hash_weights(prime: int, seed: int, width: int, device: torch.device) -> torch.Tensor:
    """Fixed random weights per token position (the same in every process and on every device: drawn on the CPU),
    made once per batch width and device. Kept on the device: a copy from the host per batch would be a blocking
    transfer, i.e. a host sync, on a GPU (two per column per micro-batch)."""
    return torch.randint(1, prime, (width,), generator=torch.Generator().manual_seed(seed)).to(device)


def token_keys(features: dict) -> torch.Tensor | None:
    """A 62-bit id per text from its token ids (equal tokens, equal id), computed on the device.

    Two texts with the same tokens are the same passage, so masking by these keys keeps a
    duplicate (in the batch or in the bank) from being a negative of its own query. The
    position is counted over real tokens, so left or right padding and batch width do not matter."""
    ids, mask = features.get("input_ids"), features.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None  # not token ids (e.g. images): no keys, no masking
    mask = torch.ones_like(ids) if mask is None else mask.long()
    position = (mask.cumsum(1) - 1).clamp(min=0)
    tokens, length = ids.long() + 1, mask.sum(1)  # (once for both moduli: a GPU micro-step is launch-bound)
    key = None
    for prime, seed in zip(_PRIMES, (1, 2)):
        term = tokens % prime * _hash_weights(prime, seed, ids.shape[1], ids.device)[position] % prime * mask
        part = (term.sum(1) + length) % prime
        key = part if key is None else key * prime + part
    return key


class ContAccumLoss(nn.Module):
    """MultipleNegativesRankingLoss with Contrastive Accumulation's dual memory bank.

    Args:
        model: the SentenceTransformer.
        memory_bank_size: N_mem in samples (past anchors and their positives, both banked). 0 is
            exactly MultipleNegativesRankingLoss (or, with mini_batch_size, CachedMNRL).
            Measured advice: about the pairs of one optimizer step (batch x accumulation x processes).
        scale: logits are similarity * scale (scale = 1 / temperature).
        similarity_fct: sentence_transformers.util.cos_sim or dot_score.
        mini_batch_size: GradCache chunk (texts per forward), as CachedMultipleNegativesRankingLoss.
        gather_across_devices: share every batch across processes (passages with gradient) and keep
            one global bank, identical on every rank.
        query_memory_bank_size: ablation override of the anchor bank (0 = pre-batch negatives).
        bank_hard_negatives: also bank the negative_* columns as further candidates.
        mask_false_negatives: a candidate with the same tokens as the anchor's positive is never its
            negative (in the batch or the bank).
        collapse_patience: with ContAccumBankCallback, stop with an error once every embedding has been the same
            vector, or the loss back at the log of the candidates after the run had learned, for this many
            optimizer steps, or never off that value while reading the bank for 5 x this many (0: off).
        bank_weight: staleness control in (0, 1]: each banked entry counts this many times (1: the paper).
        bank_warmup_steps: with ContAccumBankCallback, fill the bank without reading it for this many
            optimizer steps (XBM's warm-up).
        bank_refresh_steps: with ContAccumBankCallback, every N optimizer steps, before the step, encode every
            banked anchor and positive again with the current model (no gradient; ANCE's refresh; 0: off). The
            bank keeps their token ids (input_ids and attention_mask: text columns without token_type_ids
            segments or other inputs); not with bank_hard_negatives.
        bank_drift_probe: with ContAccumBankCallback, keep the first N anchor-positive pairs as a probe, encode them
            in eval mode before every optimizer step and move every banked vector by the change of the probe's mean
            since the last step (the encoder's common drift; 2 x N forward passes a step; 0: off). Same token
            requirements as bank_refresh_steps; not with it.

    Training updates the bank; evaluation (no grad or model.eval()) neither reads nor writes it.
    Add ContAccumBankCallback(loss) to the trainer so the bank is saved with every checkpoint
    and restored by resume_from_checkpoint; it never lands in the saved model.
    """

    def __init__(self, model, memory_bank_size: int = 0, scale: float = 20.0, similarity_fct=cos_sim,
                 mini_batch_size: int | None = None, gather_across_devices: bool = False,
                 query_memory_bank_size: int | None = None, bank_hard_negatives: bool = False,
                 mask_false_negatives: bool = True, bank_chunk_size: int | None = None, collapse_patience: int = 10,
                 bank_weight: float = 1.0, bank_warmup_steps: int = 0, bank_refresh_steps: int = 0,
                 bank_drift_probe: int = 0):
        super().__init__()
        core.check_bank_updates(bank_refresh_steps, bank_drift_probe, memory_bank_size, bank_hard_negatives)
        if similarity_fct not in SIMILARITIES:
            raise ValueError(f"similarity_fct must be sentence_transformers.util.cos_sim or dot_score, got "
                             f"{getattr(similarity_fct, '__name__', similarity_fct)}: the bank's cached scores need "
                             "to know the similarity")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (it is 1 / temperature), got {scale}")
        self.model = model
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.mini_batch_size = mini_batch_size
        self.contaccum = core.ContAccumLoss(
            memory_bank_size, 1.0 / scale, SIMILARITIES[similarity_fct], query_bank_size=query_memory_bank_size,
            bank_hard_negatives=bank_hard_negatives, mask_false_negatives=mask_false_negatives,
            gather_across_devices=gather_across_devices, bank_chunk_size=bank_chunk_size, bank_weight=bank_weight,
            bank_warmup_steps=bank_warmup_steps)
        self.gradcache = GradCache(mini_batch_size) if mini_batch_size else None
        self.collapse_patience = collapse_patience
        self.bank_refresh_steps = bank_refresh_steps
        self.bank_drift_probe = bank_drift_probe
        self.bank_update_due = False  # set by ContAccumBankCallback when a step that updates the bank begins
        self._column_settings = {}  # the bank's re-encodings: each column's non-tensor features (e.g. modality)
        self.checkpointed = False  # set by ContAccumBankCallback
        self._warned = False

    def forward(self, sentence_features, labels=None) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"ContAccumLoss needs (anchor, positive) or (anchor, positive, negative_1, ...) columns; "
                             f"the dataset gives {len(features)} column(s). Add a positive column for every anchor")
        training = self.model.training and torch.is_grad_enabled()
        self.contaccum.train(self.model.training)
        if training and self.contaccum.memory_bank_size and not self.checkpointed and not self._warned:
            self._warned = True
            logger.warning("ContAccumLoss: the memory bank is not saved with checkpoints, so a resumed run would "
                           "restart with an empty bank. Pass callbacks=[ContAccumBankCallback(loss)] to the trainer "
                           "(in a custom loop, save loss.contaccum.state_dict() yourself)")
        if training and (self.bank_refresh_steps or self.bank_drift_probe):
            self._update_bank_before_step(features[0], features[1])
        keys = [token_keys(f) for f in features]
        if self.gradcache is not None and training:
            return self.gradcache(self.model, dict(enumerate(features)), _embed_call, lambda e: self._loss(e, keys))
        return self._loss(dict(enumerate(embed_columns(self.model, features))), keys)

    def _update_bank_before_step(self, anchors: dict, positives: dict) -> None:
        """bank_refresh_steps / bank_drift_probe: re-encode the bank (or the probe) when a step begins, and keep
        the tokens they will need."""
        name = "bank_refresh_steps" if self.bank_refresh_steps else "bank_drift_probe"
        if not self.checkpointed:
            raise ValueError(f"{name} needs callbacks=[ContAccumBankCallback(loss)] in the trainer: it says when an "
                             "optimizer step begins (and saves the bank's tokens with checkpoints)")
        sides = {"query": anchors, "passage": positives}
        for side, features in sides.items():
            extra = [k for k, v in features.items() if isinstance(v, torch.Tensor)
                     and k not in ("input_ids", "attention_mask", "token_type_ids")]
            if "input_ids" not in features or extra:
                raise ValueError(f"{name} re-encodes texts from their input_ids and attention_mask (token_type_ids "
                                 f"taken as zeros), but the {side} column's features hold {extra or 'no input_ids'} "
                                 f"too: set {name}=0 for this model")
        # what is not a tensor is the column's, not a row's (modality, prompt_length): the latest batch's
        self._column_settings = {side: {k: v for k, v in f.items() if not isinstance(v, torch.Tensor)}
                                 for side, f in sides.items()}
        self.contaccum.move_bank_to(anchors["input_ids"].device)  # a resumed bank starts on the CPU
        tokens = {side: {key: f[key] for key in ("input_ids", "attention_mask")} for side, f in sides.items()}
        if self.bank_drift_probe:
            self.contaccum.keep_drift_probe(tokens, self.bank_drift_probe)
        if self.bank_update_due:
            self.bank_update_due = False
            if self.bank_refresh_steps:
                self.contaccum.refresh_bank(self._encode_pairs)
            else:
                self.contaccum.correct_drift(self._encode_pairs, self.model)
        if self.bank_refresh_steps:
            self.contaccum.keep_tokens(tokens)

    def _encode_pairs(self, features: dict) -> tuple:
        return tuple(self.model({**self._column_settings[side], **features[side]})["sentence_embedding"]
                     for side in ("query", "passage"))

    def _loss(self, embeddings: dict, keys: list) -> torch.Tensor:
        columns = [embeddings[i] for i in range(len(embeddings))]
        negatives = torch.stack(columns[2:], 1) if len(columns) > 2 else None
        negative_keys = torch.stack(keys[2:], 1) if negatives is not None and keys[2] is not None else None
        return self.contaccum(columns[0], columns[1], keys[1], negatives, negative_keys)

    @property
    def memory_bank(self):
        return self.contaccum.bank

    @property
    def uses_gradient_cache(self) -> bool:
        """sentence-transformers' flag for losses that re-embed during the backward (with mini_batch_size):
        wrappers that patch the model's forward (MatryoshkaLoss, AdaptiveLayerLoss) must know."""
        return self.gradcache is not None

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def get_config_dict(self) -> dict[str, Any]:
        c = self.contaccum
        return {"memory_bank_size": c.memory_bank_size, "query_memory_bank_size": c.query_bank_size,
                "scale": self.scale, "similarity_fct": self.similarity_fct.__name__,
                "mini_batch_size": self.mini_batch_size, "gather_across_devices": c.gather_across_devices,
                "bank_hard_negatives": c.bank.keep_hard_negatives, "mask_false_negatives": c.mask_false_negatives,
                "bank_weight": c.bank_weight, "bank_warmup_steps": c.bank_warmup_steps,
                "bank_refresh_steps": self.bank_refresh_steps, "bank_drift_probe": self.bank_drift_probe}

    @property
    def citation(self) -> str:
        return CONTACCUM_BIBTEX + ("\n\n" + GRADCACHE_BIBTEX if self.mini_batch_size else "")


def _embed_call(model, columns: dict) -> dict:
    return {c: model(features)["sentence_embedding"] for c, features in columns.items()}


class ContAccumBankCallback(TrainerCallback):
    """Stops a collapsed run (see collapse_patience), and saves the loss's memory bank with every checkpoint (contaccum_bank_rank{r}.pt, one per process)
    and restores it when training resumes from that checkpoint, so the resumed run equals the
    uninterrupted one. The checkpoint is found as the Trainer names it: output_dir/checkpoint-<step>
    (what resume_from_checkpoint=True picks), or args.resume_from_checkpoint. From elsewhere, call
    loss.contaccum.load_checkpoint(path) before train(). Before training it refuses torch.compile's CUDA graphs
    with gradient accumulation or mini_batch_size (see hf_contaccum.training_args.check_cuda_graphs)."""

    def __init__(self, loss: ContAccumLoss):
        if not isinstance(loss, ContAccumLoss):
            raise TypeError("ContAccumBankCallback takes the hf_contaccum.sentence_transformers.ContAccumLoss to save")
        self.loss = loss
        loss.checkpointed = True

    @staticmethod
    def _checkpoint_dir(args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, **kwargs):
        check_cuda_graphs(args, gradcache=self.loss.gradcache is not None)
        check_gradient_scale()
        self.loss.contaccum.defer_finite_check_to_step()  # on_pre_optimizer_step below reads it
        if state.global_step == 0 or self.loss.contaccum.restored_step == state.global_step:
            return  # a fresh run, or a bank restored by hand for this step
        explicit = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
        directory = explicit or self._checkpoint_dir(args, state)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"resuming at step {state.global_step}, but {directory} does not exist, so the memory bank cannot be "
                "restored. Call loss.contaccum.load_checkpoint(<the checkpoint folder>) before trainer.train(...)")
        self.loss.contaccum.load_checkpoint(directory, args.process_index)
        if self.loss.contaccum.restored_step != state.global_step:
            raise ValueError(
                f"the memory bank in {directory} was saved at step {self.loss.contaccum.restored_step}, but training "
                f"resumes at step {state.global_step}: call loss.contaccum.load_checkpoint(<the checkpoint you resume "
                "from>) before trainer.train(...)")

    def on_step_begin(self, args, state, control, **kwargs):
        self.loss.contaccum.start_step(state.global_step)
        refresh = self.loss.bank_refresh_steps
        refresh_due = bool(refresh) and state.global_step % refresh == 0
        self.loss.bank_update_due = refresh_due or bool(self.loss.bank_drift_probe)  # the probe: every step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.loss.contaccum.check_finite()

    def on_step_end(self, args, state, control, **kwargs):
        self.loss.contaccum.check_collapse(self.loss.collapse_patience)  # before the step's checkpoint

    def on_save(self, args, state, control, **kwargs):
        self.loss.contaccum.save_checkpoint(self._checkpoint_dir(args, state), args.process_index,
                                            global_step=state.global_step)

"""ContAccum as a sentence-transformers loss: MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss
with the memory bank, a one-line swap (aliases and the public path: hf_contaccum.sentence_transformers).

    from hf_contaccum.sentence_transformers import ContAccumMultipleNegativesRankingLoss

    loss = ContAccumMultipleNegativesRankingLoss(model)      # the bank is "auto": one optimizer step's pairs
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)

Every option of MNRL and CachedMNRL keeps its meaning, default and config key; the bank is saved with
each checkpoint, restored on resume and guarded without a callback. Columns follow sentence-transformers'
convention: (anchor, positive) or (anchor, positive, negative_1, ..., negative_n). docs/sentence-transformers.md.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import has_static_embedding_input
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import cos_sim, dot_score
from torch import nn

from ..citations import CONTACCUM_BIBTEX, GRADCACHE_BIBTEX
from ..core.gather import world
from ..core.loss import ContAccumLoss as CoreLoss
from ..core.objective import Objective
from ..data.keys import token_keys
from ..settings import ContAccumSettings
from .st_attach import attach, find_trainer, intermediate_layer
from .st_cached import CachedPass

SIMILARITY_NAMES = {cos_sim: "cos", dot_score: "dot"}  # sentence-transformers' functions -> the bank's fast path
SETTINGS_KEYS = ("query_memory_bank_size", "bank_hard_negatives", "mask_false_negatives", "bank_refresh_steps",
                 "bank_drift_probe", "collapse_patience")


def similarity_name(fct):
    """"cos" / "dot" for sentence-transformers' cos_sim and dot_score (also as a bare functools.partial), else the
    callable itself (any (a, b) -> (len a, len b) score function works; without the bank's incremental cache)."""
    base = getattr(fct, "func", fct) if not getattr(fct, "args", ()) and not getattr(fct, "keywords", {}) else fct
    return SIMILARITY_NAMES.get(base, fct)


class ContAccumMultipleNegativesRankingLoss(nn.Module):
    """MultipleNegativesRankingLoss with Contrastive Accumulation's dual memory bank.

    Args (sentence-transformers' own, same meaning and defaults): model, scale, similarity_fct,
    gather_across_devices (default True here: it only acts with several processes, and one global bank needs
    it), directions, partition_mode, hardness_mode, hardness_strength; with mini_batch_size: GradCache as
    CachedMultipleNegativesRankingLoss (mini_batch_num_tokens, show_progress_bar).
    Args (the bank's): memory_bank_size ("auto": the pairs of one optimizer step; 0: exactly MNRL / CachedMNRL),
    and the ContAccumSettings fields (query_memory_bank_size, bank_hard_negatives, mask_false_negatives,
    bank_refresh_steps, bank_drift_probe, collapse_patience). name: the bank files' name (default: the
    dataset's key with a loss per dataset).

    In a Trainer the loss finds it and adds its lifecycle itself (checkpointed bank, checks, bank statistics
    in the logs). Evaluation (no grad or model.eval()) neither reads nor writes the bank."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, gather_across_devices: bool = True,
                 directions=("query_to_doc",), partition_mode: str = "joint", hardness_mode: str | None = None,
                 hardness_strength: float = 0.0, mini_batch_size: int | None = None,
                 mini_batch_num_tokens: int | None = None, show_progress_bar: bool = False,
                 memory_bank_size: int | str = "auto", name: str | None = None, **settings):
        super().__init__()
        unknown = set(settings) - set(SETTINGS_KEYS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        if mini_batch_size is not None and has_static_embedding_input(model):
            raise ValueError(f"{type(self).__name__} with mini_batch_size is not compatible with a StaticEmbedding "
                             "model, whose inputs cannot be split into mini-batches: use mini_batch_size=None")
        if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
            raise ValueError("mini_batch_num_tokens must be a positive integer or None")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (it is 1 / temperature), got {scale}")
        self.model = model
        self.mini_batch_size, self.mini_batch_num_tokens = mini_batch_size, mini_batch_num_tokens
        self.show_progress_bar, self.name = show_progress_bar, name
        self._objective = Objective(tuple(directions), partition_mode, hardness_mode, hardness_strength)
        self._settings = ContAccumSettings(memory_bank_size, similarity=similarity_name(similarity_fct),
                                           temperature=1.0 / scale, gather_across_devices=gather_across_devices,
                                           **settings)
        self._scale, self._similarity_fct = scale, similarity_fct
        self.banks = nn.ModuleDict()  # width -> the core ContAccumLoss: one bank per embedding width (MatryoshkaLoss)
        self.pairs_per_step = None  # set when a Trainer is found: what memory_bank_size="auto" means
        self._last_batch = {}  # width -> the micro-batch seen last: a wrapper's repeated call does not enqueue again
        self._trainer = None  # the Trainer this loss equipped
        self._steps_told = False  # begin_step called by a loop of the user's own
        self._cached = CachedPass(self) if mini_batch_size else None

    # -- sentence-transformers' attributes, assignable as on its own losses --------------------
    scale = property(lambda self: self._scale, lambda self, value: self._set(scale=value))
    similarity_fct = property(lambda self: self._similarity_fct, lambda self, value: self._set(similarity_fct=value))
    gather_across_devices = property(lambda self: self._settings.gather_across_devices,
                                     lambda self, value: self._set(gather_across_devices=value))
    directions = property(lambda self: self._objective.directions, lambda self, v: self._set(directions=v))
    partition_mode = property(lambda self: self._objective.partition_mode, lambda self, v: self._set(partition_mode=v))
    hardness_mode = property(lambda self: self._objective.hardness_mode, lambda self, v: self._set(hardness_mode=v))
    hardness_strength = property(lambda self: self._objective.hardness_strength,
                                 lambda self, v: self._set(hardness_strength=v))
    temperature = property(lambda self: 1.0 / self._scale)
    uses_gradient_cache = property(lambda self: self.mini_batch_size is not None)

    def _set(self, **changes) -> None:
        """Apply an assignment; a bank that holds vectors made for the old setting is refused, not kept silently."""
        if any(bank.bank.fill for bank in self.banks.values()) and set(changes) & {"similarity_fct",
                                                                               "gather_across_devices"}:
            raise ValueError(f"{', '.join(changes)} cannot change while the memory bank holds vectors made for the "
                             "old value: call loss.reset_bank() first")
        if "scale" in changes and not changes["scale"] > 0:
            raise ValueError(f"scale must be > 0 (it is 1 / temperature), got {changes['scale']}")
        self._scale = changes.get("scale", self._scale)
        self._similarity_fct = changes.get("similarity_fct", self._similarity_fct)
        objective = {k: changes.get(k, getattr(self._objective, k)) for k in ("directions", "partition_mode",
                                                                          "hardness_mode", "hardness_strength")}
        self._objective = Objective(**objective)
        self._settings = ContAccumSettings(**{**self._settings.__dict__, "temperature": 1.0 / self._scale,
                                              "similarity": similarity_name(self._similarity_fct),
                                              "gather_across_devices": changes.get(
                                                  "gather_across_devices", self._settings.gather_across_devices)})
        saved = {width: bank.state_dict() for width, bank in self.banks.items()}
        self.banks = nn.ModuleDict()
        for width, state in saved.items():  # the same bank contents, with the new temperature and objective
            self.bank_for(int(width)).load_state_dict(state)
            self.banks[width].cache.stale = True

    # -- the banks -----------------------------------------------------------------------
    def bank_for(self, width: int) -> CoreLoss:
        key = str(width)
        if key not in self.banks:
            settings = self._settings.resolved(self.pairs_per_step) if self.pairs_per_step else self._settings
            self.banks[key] = CoreLoss(settings=settings, objective=self._objective).to(self._device())
        return self.banks[key]

    def _device(self):
        return next(self.model.parameters()).device

    @property
    def memory_bank(self):
        """The bank of the full embedding width."""
        return self.bank_for(self._widths()[0]).bank if self._widths() else None

    def _widths(self) -> list[int]:
        dims = [int(w) for w in self.banks]
        return sorted(dims, reverse=True)

    def begin_step(self, step: int) -> None:
        """For a loop of your own: call before each optimizer step (step = steps done). Trainers need not."""
        self._steps_told = True
        for bank in self.banks.values():
            bank.begin_step(step)

    def reset_bank(self) -> None:
        for bank in self.banks.values():
            bank.reset()

    def contaccum_cores(self) -> dict:
        """{file name: core ContAccumLoss} of this loss's banks, for the lifecycle."""
        base = self.name or ""
        widths = self._widths()
        if len(widths) <= 1:
            return {base: self.banks[str(widths[0])]} if widths else {}
        return {f"{base}{'_' if base else ''}d{w}": self.banks[str(w)] for w in widths}

    # -- the loss ------------------------------------------------------------------------
    def forward(self, sentence_features, labels=None) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"{type(self).__name__} needs (anchor, positive) or (anchor, positive, negative_1, ...) "
                             f"columns; the dataset gives {len(features)} column(s). Add a positive column")
        training = self.model.training and torch.is_grad_enabled()
        if training and self._trainer is None:
            self._ensure_attached()
        if self._cached is not None:
            return self._cached.forward_cached(features, labels)
        intermediate = intermediate_layer(self.model)  # AdaptiveLayerLoss's earlier layers: never banked

        def encode(pair_features):  # the staleness controls' encoder: anchors and positives, no caching
            return tuple(self.model(pair_features[side])["sentence_embedding"] for side in ("query", "passage"))

        if training and not intermediate:
            self._update_stale_banks(features, encode)
        embeddings = embed_columns(self.model, features)
        repeated = intermediate or self._repeated(features[0], embeddings[0].shape[-1])
        return self.loss_on(embeddings, [token_keys(f) for f in features], enqueue=not repeated)

    def loss_on(self, embeddings: list, keys: list, enqueue: bool = True) -> torch.Tensor:
        """The loss of one batch of column embeddings (anchors, positives, negatives...) with their passage keys."""
        if self.pairs_per_step is None and self._settings.memory_bank_size == "auto" and self.model.training:
            self._auto_outside_a_trainer(embeddings[0].shape[0])
        core = self.bank_for(embeddings[0].shape[-1])
        core.train(self.model.training)
        negatives = torch.stack(embeddings[2:], 1) if len(embeddings) > 2 else None
        negative_keys = torch.stack(keys[2:], 1) if negatives is not None and keys[2] is not None else None
        # a wrapper's further call of this micro-batch (AdaptiveLayerLoss's earlier layers) reads the bank and
        # adds nothing to it: the bank holds the model's own embeddings only
        return core(embeddings[0], embeddings[1], keys[1], negatives, negative_keys, enqueue=enqueue)

    def calculate_loss(self, reps, labels=None, *, with_backward: bool = False) -> torch.Tensor:
        """sentence-transformers' gradient-cache protocol (what MatryoshkaLoss decorates): the loss of the
        mini-batches' embeddings, per column; with_backward back-propagates it to them and returns it detached."""
        loss = self.loss_on([torch.cat(column) for column in reps], self._cached.keys)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _auto_outside_a_trainer(self, rows: int) -> None:
        """memory_bank_size="auto" with no Trainer to say what an optimizer step is: one micro-batch's pairs."""
        processes = world()[1] if self.gather_across_devices else 1
        self.pairs_per_step = rows * processes
        warnings.warn(f"memory_bank_size='auto' is the pairs of one optimizer step, which only a Trainer knows; "
                      f"outside one it is one micro-batch's: {self.pairs_per_step}. Give memory_bank_size=<batch x "
                      "accumulation steps x processes> for a loop of your own", stacklevel=4)

    def _repeated(self, anchors: dict, width: int) -> bool:
        """Whether a wrapper calls this loss again, at this width, for the micro-batch it called it for last (the
        same feature tensors): the bank of that width has it already."""
        ids = anchors.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return False
        last = self._last_batch.get(width)
        self._last_batch[width] = weakref.ref(ids)
        return last is not None and last() is ids

    def _update_stale_banks(self, features, encode) -> None:
        """bank_refresh_steps / bank_drift_probe: at a step's first micro-batch, before its forward."""
        if not (self._settings.bank_refresh_steps or self._settings.bank_drift_probe):
            return
        if self._trainer is None and not self._steps_told:
            raise ValueError("bank_refresh_steps and bank_drift_probe need to know when an optimizer step begins: "
                             "train with a Trainer (the loss finds it), or call loss.begin_step(step) before each "
                             "optimizer step of your own loop")
        for side, f in zip(("query", "passage"), features[:2]):
            extra = [k for k, v in f.items() if isinstance(v, torch.Tensor)
                     and k not in ("input_ids", "attention_mask", "token_type_ids")]
            if "input_ids" not in f or extra:
                raise ValueError(f"bank_refresh_steps and bank_drift_probe re-encode texts from their input_ids and "
                                 f"attention_mask, but the {side} column's features hold {extra or 'no input_ids'}: "
                                 "set both to 0 for this model")
        settings = {side: {k: v for k, v in f.items() if not isinstance(v, torch.Tensor)}
                    for side, f in zip(("query", "passage"), features[:2])}
        tokens = {side: {k: f[k] for k in ("input_ids", "attention_mask")}
                  for side, f in zip(("query", "passage"), features[:2])}

        def encode_with_settings(pairs):
            return encode({side: {**settings[side], **pairs[side]} for side in pairs})

        for core in list(self.banks.values()) or [self.bank_for(self._full_width())]:
            core.before_micro_batch(tokens, encode_with_settings, self.model)

    def _full_width(self) -> int:
        dim = getattr(self.model, "get_sentence_embedding_dimension", lambda: None)()
        if dim is None:
            raise ValueError("the model does not say its embedding width: the bank cannot be built before the first "
                             "batch; set bank_refresh_steps and bank_drift_probe to 0")
        return dim

    # -- a Trainer, found and equipped once ----------------------------------------------
    def _apply(self, fn, recurse=True):
        """sentence-transformers' trainer moves every loss to the model's device while it is built (prepare_loss):
        the moment to find that trainer and add the lifecycle, before any train() call."""
        self._ensure_attached()
        return super()._apply(fn, recurse)

    def _ensure_attached(self) -> None:
        trainer = find_trainer(sys._getframe(1))
        if trainer is not None and self._trainer is not trainer:
            attach(trainer)
            self._trainer = trainer

    # -- sentence-transformers' config and card ----------------------------------------
    def get_config_dict(self) -> dict[str, Any]:
        from sentence_transformers.util.misc import similarity_fct_name

        config = {"scale": self.scale, "similarity_fct": similarity_fct_name(self.similarity_fct),
                  "gather_across_devices": self.gather_across_devices, "directions": self.directions,
                  "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode,
                  "hardness_strength": self.hardness_strength}
        if self.mini_batch_size is not None:
            config.update(mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens)
        bank = self._settings.resolved(self.pairs_per_step) if self.pairs_per_step else self._settings
        config.update(memory_bank_size=bank.memory_bank_size,
                      **{key: getattr(self._settings, key) for key in SETTINGS_KEYS if key != "collapse_patience"})
        return config

    @property
    def citation(self) -> str:
        return CONTACCUM_BIBTEX + ("\n\n" + GRADCACHE_BIBTEX if self.mini_batch_size else "")


class CachedContAccumMultipleNegativesRankingLoss(ContAccumMultipleNegativesRankingLoss):
    """CachedMultipleNegativesRankingLoss with the memory bank: GradCache over mini-batches of mini_batch_size
    (default 32, as CachedMNRL), so a large batch trains at one mini-batch's activation memory."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, mini_batch_size: int = 32, **kwargs):
        super().__init__(model, scale, similarity_fct, mini_batch_size=mini_batch_size, **kwargs)

"""BiEncoder: a dual encoder that is a transformers PreTrainedModel.

Being a PreTrainedModel gives save_pretrained / from_pretrained, push_to_hub and the Trainer's model
card; each tower is a plain transformers encoder, so a saved tower also loads with AutoModel, and a
shared-tower folder is a sentence-transformers model as well.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from ..settings import normalize as similarity_vectors
from .config import BiEncoderConfig
from .hub import (
    model_name_for_card,
    read_sentence_transformers_folder,
    saved_tokenizer,
    write_sentence_transformers_files,
)
from .towers import (
    encoder_from_config,
    ensure_eos,
    peft_config_dict,
    stack_padded,
    with_adapters,
)

DEFAULT_MAX_LENGTH = {"query": 64, "passage": 256}


@dataclass
class BiEncoderOutput(ModelOutput):
    query_embeddings: torch.Tensor | None = None
    passage_embeddings: torch.Tensor | None = None


class BiEncoder(PreTrainedModel):
    """Query and passage towers (one shared tower or two), pooling, optional L2 norm."""

    config_class = BiEncoderConfig
    base_model_prefix = "biencoder"
    # The Trainer must not treat this as a model that scales its own loss (see trainer.py).
    accepts_loss_kwargs = False

    supports_gradient_checkpointing = True

    def __init__(self, config: BiEncoderConfig, query_encoder=None, passage_encoder=None):
        super().__init__(config)
        peft = getattr(config, "peft_config", None)
        self.query_encoder = with_adapters(
            query_encoder if query_encoder is not None else encoder_from_config(config.encoder_config), peft)
        if not config.shared:
            self.passage_encoder = with_adapters(passage_encoder if passage_encoder is not None
                                                  else encoder_from_config(config.encoder_config), peft)
        self.tokenizer = None
        self.post_init()
        self._freeze_unused_poolers()
        base = getattr(self.query_encoder, "get_base_model", lambda: self.query_encoder)()
        parameters = inspect.signature(base.forward).parameters
        # decoders take no token types (a BERT-style tokenizer still makes them), and must not build a KV cache
        self._takes_token_types = "token_type_ids" in parameters
        self._takes_use_cache = "use_cache" in parameters

    def _towers(self) -> dict:
        """{"query_encoder": ..., "passage_encoder": ...}: the distinct towers, by attribute name."""
        return {"query_encoder": self.query_encoder, **({} if self.config.shared else
                                                        {"passage_encoder": self.passage_encoder})}

    def _freeze_unused_poolers(self):
        """A tower's own pooler (BERT's dense+tanh on [CLS]) is never used: we pool the hidden states.
        Left trainable, it gets no gradient, which FSDP and DeepSpeed checkpoints cannot handle (a
        trainable parameter without optimizer state); frozen, it stays in the weights for AutoModel."""
        for tower in self._towers().values():
            pooler = getattr(tower, "pooler", None)
            if isinstance(pooler, torch.nn.Module):
                pooler.requires_grad_(False)

    def _restore_trainable(self):
        """transformers 5 rebuilds the parameters while loading, every one trainable again: freeze what was
        frozen (the base weights under adapters, the unused poolers)."""
        for tower in self._towers().values():
            if hasattr(tower, "base_model") and hasattr(tower.base_model, "_mark_only_adapters_as_trainable"):
                tower.base_model._mark_only_adapters_as_trainable(tower.base_model.model)  # PEFT's own rule
        self._freeze_unused_poolers()

    def _init_weights(self, module):
        # towers are initialised by their own classes (or loaded); nothing to add here
        pass

    def init_weights(self):
        """Called by post_init when the BiEncoder is built: the towers are complete transformers models
        that initialised themselves (AutoModel.from_config) or were loaded, so there is nothing to
        initialise again, and under DeepSpeed ZeRO-3 their parameters are already partitioned (an init
        here would index empty shards). Weights missing from a loaded checkpoint are still initialised
        by from_pretrained, which calls initialize_weights."""
        self.tie_weights(recompute_mapping=False)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_encoder(cls, name_or_path: str, shared: bool | None = None, pooling: str | None = None,
                     normalize: bool | None = None, prompts: dict | None = None, peft_config=None,
                     append_eos: bool = False, **hub_kwargs) -> BiEncoder:
        """Build from any transformers encoder or decoder checkpoint (hub id or local folder), or a local
        sentence-transformers folder, whose pooling, normalisation, similarity, prompts and max length are
        the defaults then (one shared tower); arguments given win.

        Otherwise the defaults are one shared tower, mean pooling, no normalisation. prompts: {"query": ...,
        "passage": ...} put before every query / passage, in training, evaluation, and in the saved
        sentence-transformers files. peft_config: e.g. peft.LoraConfig(...): each tower trains adapters only.
        append_eos: end every text with the tokenizer's EOS token (decoder embedders with pooling="last"). A
        tokenizer without a pad token pads with its EOS token."""
        folder = read_sentence_transformers_folder(name_or_path) if os.path.isdir(str(name_or_path)) else None
        found = folder or {}
        encoder_path = found.get("encoder", name_or_path)
        shared = True if shared is None else shared
        query = AutoModel.from_pretrained(encoder_path, **hub_kwargs)
        passage = None if shared else AutoModel.from_pretrained(encoder_path, **hub_kwargs)
        config = BiEncoderConfig(query.config, shared=shared, pooling=pooling or found.get("pooling", "mean"),
                                 normalize=found.get("normalize", False) if normalize is None else normalize,
                                 prompts=found.get("prompts") if prompts is None else prompts,
                                 similarity=found.get("similarity", "dot"),
                                 passage_max_length=found.get("max_seq_length"),
                                 peft_config=peft_config_dict(peft_config) if peft_config is not None else None,
                                 base_model_name=model_name_for_card(name_or_path))  # never a local path
        model = cls(config, query_encoder=query, passage_encoder=passage)  # __init__ adds the adapters
        tokenizer = AutoTokenizer.from_pretrained(encoder_path if folder else name_or_path, **hub_kwargs)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have none; masked out anyway
        if append_eos:
            ensure_eos(tokenizer)
        model.tokenizer = tokenizer
        return model

    @classmethod
    def from_encoder_config(cls, encoder_config: PretrainedConfig, shared=True, pooling="mean", normalize=False,
                            prompts=None, peft_config=None):
        """Randomly initialised towers from a config (tests, or training from scratch)."""
        peft = peft_config_dict(peft_config) if peft_config is not None else None
        return cls(BiEncoderConfig(encoder_config, shared=shared, pooling=pooling, normalize=normalize,
                                   prompts=prompts, peft_config=peft))

    def merge_adapters(self) -> BiEncoder:
        """Fold PEFT adapters into the towers' weights (in place): the model then saves and loads as plain
        towers everywhere, with the same embeddings. Returns self."""
        if self.config.peft_config is None:
            return self
        for name, tower in self._towers().items():
            setattr(self, name, tower.merge_and_unload())
        self.config.peft_config = None
        self.requires_grad_(True)
        self._freeze_unused_poolers()
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """A saved BiEncoder (a folder or a hub id), or a local sentence-transformers folder (as from_encoder)."""
        source = str(args[0] if args else kwargs["pretrained_model_name_or_path"])
        if os.path.isdir(source) and read_sentence_transformers_folder(source) is not None:
            return cls.from_encoder(source, **{k: v for k, v in kwargs.items() if k != "pretrained_model_name_or_path"})
        model = super().from_pretrained(*args, **kwargs)
        model._restore_trainable()
        model.tokenizer = saved_tokenizer(source)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The BiEncoder checkpoint, plus each tower as a plain transformers encoder in
        query_encoder/ (and passage_encoder/), loadable with AutoModel, and, for a shared
        tower, the module files that make the folder a sentence-transformers model.
        The towers' weights are thus stored twice: the price of loading everywhere."""
        towers = self._towers()
        # Under FSDP/DeepSpeed the Trainer passes the gathered state dict: the towers are saved from it, not
        # from their shards. Split it first: transformers' save_pretrained empties the dict it is given.
        full_state = kwargs.get("state_dict")
        tower_states = {name: None if full_state is None else {
            key[len(name) + 1:]: value for key, value in full_state.items() if key.startswith(name + ".")}
            for name in towers}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        for name, tower in towers.items():
            tower.save_pretrained(os.path.join(save_directory, name), state_dict=tower_states[name])
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(os.path.join(save_directory, name))
        if self.config.shared:
            write_sentence_transformers_files(self, save_directory)

    def similarity(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """Scores (num_queries, num_passages) with the similarity the model was trained with."""
        similarity = self.config.similarity
        return similarity_vectors(queries, similarity) @ similarity_vectors(passages, similarity).T

    def get_input_embeddings(self):
        """The query tower's token embeddings (FSDP and resize_token_embeddings look for them)."""
        return self.query_encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        """Sets the query tower's (= the shared tower's) token embeddings; a separate passage tower keeps its own."""
        self.query_encoder.set_input_embeddings(value)

    @property
    def passage_tower(self):
        return self.query_encoder if self.config.shared else self.passage_encoder

    # -- encoding --------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            out = hidden[:, 0]
        elif self.config.pooling == "last":
            # the last attended position: the end of the text with right padding, the final column with left
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.bool() * positions).argmax(1)
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(out, dim=-1) if self.config.normalize else out

    def _embed(self, tower, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        return self.pool(tower(**kwargs).last_hidden_state, attention_mask)

    def forward(self, query_input_ids=None, query_attention_mask=None, passage_input_ids=None,
                passage_attention_mask=None, query_token_type_ids=None, passage_token_type_ids=None,
                one_tower_call=False):
        """One call for both towers, so DDP sees every parameter used in one forward.

        one_tower_call (shared tower, both sides given): queries and passages go through the tower as ONE batch,
        the shorter side padded at the end to the longer length: half the kernel launches, more padded tokens."""
        if one_tower_call and query_input_ids is not None and passage_input_ids is not None:
            if not self.config.shared:
                raise ValueError("one_tower_call needs one shared tower (shared=True); separate towers are two calls")
            n = query_input_ids.shape[0]
            both = stack_padded([query_input_ids, passage_input_ids], [query_attention_mask, passage_attention_mask],
                                 [query_token_type_ids, passage_token_type_ids])
            embeddings = self._embed(self.query_encoder, *both)
            return BiEncoderOutput(query_embeddings=embeddings[:n], passage_embeddings=embeddings[n:])
        q = p = None
        if query_input_ids is not None:
            q = self._embed(self.query_encoder, query_input_ids, query_attention_mask, query_token_type_ids)
        if passage_input_ids is not None:
            p = self._embed(self.passage_tower, passage_input_ids, passage_attention_mask, passage_token_type_ids)
        return BiEncoderOutput(query_embeddings=q, passage_embeddings=p)

    @torch.no_grad()
    def _encode_texts(self, texts, side, batch_size, max_length, tokenizer, show_progress):
        from tqdm.auto import tqdm

        tokenizer = tokenizer or self.tokenizer
        max_length = max_length or getattr(self.config, f"{side}_max_length", None) or DEFAULT_MAX_LENGTH[side]
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=... or load the model with from_encoder/from_pretrained")
        was_training = self.training
        self.eval()
        prompt = (self.config.prompts or {}).get(side, "")
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc=f"encode {side}", disable=not show_progress):
            batch = tokenizer([prompt + t for t in texts[start:start + batch_size]], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(self.device)
            kwargs = {f"{side}_{k}": v for k, v in batch.items()}
            emb = self(**kwargs)[f"{side}_embeddings"]
            out.append(emb.float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.config.encoder_config.get("hidden_size", 0))

    def encode_queries(self, texts, batch_size=64, max_length=None, tokenizer=None, show_progress=False):
        """(len texts, d) float32 CPU vectors of queries (prompt put before each); max_length: the one training
        used (config.query_max_length), else 64."""
        return self._encode_texts(texts, "query", batch_size, max_length, tokenizer, show_progress)

    def encode_passages(self, texts, batch_size=64, max_length=None, tokenizer=None, show_progress=False):
        """(len texts, d) float32 CPU vectors of passages; max_length: training's (config.passage_max_length),
        else 256."""
        return self._encode_texts(texts, "passage", batch_size, max_length, tokenizer, show_progress)

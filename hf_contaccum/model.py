"""BiEncoder: a dual encoder that is a transformers PreTrainedModel.

Being a PreTrainedModel gives save_pretrained / from_pretrained, push_to_hub and the
Trainer's model card for free; each tower is a plain transformers encoder, so a saved
tower also loads with AutoModel.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from .model_card import model_name_for_card

POOLINGS = ("cls", "mean", "last")  # "last": the last attended token (decoder LLM embedders)
ST_POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
SIDES = ("query", "passage")
SIMILARITIES = {"dot": "dot", "cos": "cosine"}  # ours -> sentence-transformers' similarity_fn_name


class BiEncoderConfig(PretrainedConfig):
    model_type = "contaccum_biencoder"

    def __init__(self, encoder_config=None, shared=True, pooling="mean", normalize=False, similarity="dot",
                 prompts=None, peft_config=None, **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {similarity!r}")
        prompts = dict(prompts or {})
        if set(prompts) - set(SIDES) or not all(isinstance(v, str) for v in prompts.values()):
            raise ValueError(f"prompts maps 'query' and/or 'passage' to a text put before every such text, got {prompts!r}")
        if isinstance(encoder_config, PretrainedConfig):
            encoder_config = encoder_config.to_dict()
        self.encoder_config = encoder_config or {}
        self.shared = shared
        self.pooling = pooling
        self.normalize = normalize
        self.similarity = similarity  # how a query and a passage are scored; ContAccumTrainer sets it
        self.prompts = prompts  # {"query": "query: ", "passage": "passage: "}: prepended in training and encoding
        self.peft_config = peft_config  # a PEFT (e.g. LoRA) config as a dict: the towers carry adapters


@dataclass
class BiEncoderOutput(ModelOutput):
    query_embeddings: torch.Tensor | None = None
    passage_embeddings: torch.Tensor | None = None


def _encoder_from_config(config_dict: dict):
    cfg = AutoConfig.for_model(**config_dict)
    return AutoModel.from_config(cfg)


def _with_adapters(tower, peft_config):
    """The tower wrapped in a PEFT model (only the adapters train); a tower that has them already is kept."""
    if peft_config is None:  # before importing peft: it is an optional dependency
        return tower
    from peft import PeftConfig, PeftModel, get_peft_model

    if isinstance(tower, PeftModel):
        return tower
    if isinstance(peft_config, dict):
        peft_config = PeftConfig.from_peft_type(**peft_config)
    wrapped = get_peft_model(tower, copy.deepcopy(peft_config))  # a copy each: get_peft_model fills it in
    adapter = wrapped.peft_config["default"]
    # a tower rebuilt from a config has no path: keep the base model the adapters were trained on
    adapter.base_model_name_or_path = adapter.base_model_name_or_path or peft_config.base_model_name_or_path
    return wrapped


def _peft_config_dict(peft_config) -> dict:
    """JSON-ready: target module sets become sorted lists."""
    return json.loads(json.dumps(peft_config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _saved_tokenizer(source: str):
    """The tokenizer the Trainer saved beside a BiEncoder's weights, or None where none was saved. A local folder
    is looked at first: asked for a tokenizer a folder lacks, transformers may fail in ways that also mean a broken
    one (5.5.4 raised an ImportError about protobuf), and a broken tokenizer must not pass for a missing one."""
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, name)) for name in ("tokenizer_config.json", "tokenizer.json")):
            return None
        return AutoTokenizer.from_pretrained(source)
    try:  # a hub repository: only asking tells
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None


def ensure_eos(tokenizer) -> None:
    """Make a fast tokenizer end every text with its EOS token (decoder embedders pool the last token, and
    EOS is the token trained to summarise the text). Done in the tokenizer's own post-processor, so that
    it is saved with it and every loader (ours, transformers, sentence-transformers) tokenises alike;
    truncation keeps room for it."""
    from tokenizers.processors import TemplateProcessing

    if tokenizer.eos_token is None:
        raise ValueError("append_eos needs a tokenizer with an eos_token")
    ids = tokenizer("a")["input_ids"]
    if ids[-1] == tokenizer.eos_token_id:
        return
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("append_eos needs a fast tokenizer (its post-processor appends the EOS token)")
    bos = tokenizer.bos_token if ids[0] == tokenizer.bos_token_id else None
    first = f"{bos} " if bos else ""
    special = [(t, tokenizer.convert_tokens_to_ids(t)) for t in dict.fromkeys(filter(None, [bos, tokenizer.eos_token]))]
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{first}$A {tokenizer.eos_token}", pair=f"{first}$A {tokenizer.eos_token} $B:1 {tokenizer.eos_token}:1",
        special_tokens=special)


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
        self.query_encoder = _with_adapters(
            query_encoder if query_encoder is not None else _encoder_from_config(config.encoder_config), peft)
        if not config.shared:
            self.passage_encoder = _with_adapters(passage_encoder if passage_encoder is not None
                                                  else _encoder_from_config(config.encoder_config), peft)
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
    def from_encoder(cls, name_or_path: str, shared: bool = True, pooling: str = "mean",
                     normalize: bool = False, prompts: dict | None = None, peft_config=None,
                     append_eos: bool = False, **hub_kwargs) -> BiEncoder:
        """Build from any transformers encoder or decoder checkpoint (hub id or local folder).

        prompts: {"query": ..., "passage": ...} put before every query / passage, in training, evaluation,
        and in the saved sentence-transformers files. peft_config: e.g. peft.LoraConfig(...): each tower
        trains adapters only. append_eos: end every text with the tokenizer's EOS token (decoder
        embedders with pooling="last"). A tokenizer without a pad token pads with its EOS token."""
        query = AutoModel.from_pretrained(name_or_path, **hub_kwargs)
        passage = None if shared else AutoModel.from_pretrained(name_or_path, **hub_kwargs)
        config = BiEncoderConfig(query.config, shared=shared, pooling=pooling, normalize=normalize, prompts=prompts,
                                 peft_config=_peft_config_dict(peft_config) if peft_config is not None else None,
                                 base_model_name=model_name_for_card(name_or_path))  # never a local path
        model = cls(config, query_encoder=query, passage_encoder=passage)  # __init__ adds the adapters
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
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
        peft = _peft_config_dict(peft_config) if peft_config is not None else None
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
        model = super().from_pretrained(*args, **kwargs)
        model._restore_trainable()
        model.tokenizer = _saved_tokenizer(str(args[0] if args else kwargs["pretrained_model_name_or_path"]))
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
            self._write_sentence_transformers_files(save_directory)

    def _write_sentence_transformers_files(self, root):
        dim = self.query_encoder.config.hidden_size
        max_len = getattr(self.tokenizer, "model_max_length", 512) if self.tokenizer is not None else 512
        modules = [{"idx": 0, "name": "0", "path": "query_encoder", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.config.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(root, "2_Normalize"), exist_ok=True)
        pooling = {"word_embedding_dimension": dim, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True,
                   **{key: self.config.pooling == name for name, key in ST_POOLING.items()}}
        st_config = {"similarity_fn_name": SIMILARITIES[self.config.similarity]}
        if self.config.prompts:  # encode(texts, prompt_name="query"); "document" is what encode_document looks up
            prompts = dict(self.config.prompts)
            if "passage" in prompts:
                prompts["document"] = prompts["passage"]
            st_config.update(prompts=prompts, default_prompt_name=None)
        files = {"modules.json": modules, "1_Pooling/config.json": pooling,
                 "query_encoder/sentence_bert_config.json": {"max_seq_length": min(int(max_len), 512),
                                                             "do_lower_case": False},
                 "config_sentence_transformers.json": st_config}
        for rel, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
            with open(os.path.join(root, rel), "w") as f:
                json.dump(content, f, indent=2)

    def similarity(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """Scores (num_queries, num_passages) with the similarity the model was trained with."""
        if self.config.similarity == "cos":
            queries, passages = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
        return queries @ passages.T

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
            both = _stack_padded([query_input_ids, passage_input_ids], [query_attention_mask, passage_attention_mask],
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

    def encode_queries(self, texts, batch_size=64, max_length=64, tokenizer=None, show_progress=False):
        return self._encode_texts(texts, "query", batch_size, max_length, tokenizer, show_progress)

    def encode_passages(self, texts, batch_size=64, max_length=256, tokenizer=None, show_progress=False):
        return self._encode_texts(texts, "passage", batch_size, max_length, tokenizer, show_progress)


def _stack_padded(input_ids, attention_masks, token_type_ids):
    """Batches of different lengths as one: each widened to the longest with masked positions appended at
    the end, so every text keeps its own token positions (right or left padded) and its pooled vector."""
    length = max(ids.shape[1] for ids in input_ids)

    def widen(tensors):
        return torch.cat([F.pad(t, (0, length - t.shape[1])) for t in tensors])

    types = None
    if any(t is not None for t in token_type_ids):
        types = widen([t if t is not None else torch.zeros_like(ids) for t, ids in zip(token_type_ids, input_ids)])
    return widen(input_ids), widen(attention_masks), types


AutoConfig.register(BiEncoderConfig.model_type, BiEncoderConfig)

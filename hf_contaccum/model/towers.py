"""What a tower needs beyond transformers: adapters, an EOS at the end of every text, one padded batch of two."""
from __future__ import annotations

import copy
import json

import torch.nn.functional as F
from transformers import AutoConfig, AutoModel


def encoder_from_config(config_dict: dict):
    return AutoModel.from_config(AutoConfig.for_model(**config_dict))


def with_adapters(tower, peft_config):
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


def peft_config_dict(peft_config) -> dict:
    """JSON-ready: target module sets become sorted lists."""
    return json.loads(json.dumps(peft_config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def ensure_eos(tokenizer) -> None:
    """Make a fast tokenizer end every text with its EOS token (decoder embedders pool the last token, and EOS is
    the token trained to summarise the text). Done in the tokenizer's own post-processor, so that it is saved with
    it and every loader (ours, transformers, sentence-transformers) tokenises alike; truncation keeps room for it."""
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


def stack_padded(input_ids, attention_masks, token_type_ids):
    """Batches of different lengths as one: each widened to the longest with masked positions appended at the end,
    so every text keeps its own token positions (right or left padded) and its pooled vector."""
    length = max(ids.shape[1] for ids in input_ids)

    def widen(tensors):
        import torch
        return torch.cat([F.pad(t, (0, length - t.shape[1])) for t in tensors])

    types = None
    if any(t is not None for t in token_type_ids):
        import torch
        types = widen([t if t is not None else torch.zeros_like(ids) for t, ids in zip(token_type_ids, input_ids)])
    return widen(input_ids), widen(attention_masks), types

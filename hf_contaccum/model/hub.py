"""Model folders on disk and on the hub: sentence-transformers files written and read, tokenizers, card names."""
from __future__ import annotations

import json
import os
import re

from transformers import AutoTokenizer

ST_POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
ST_POOLING_MODE = {"cls": "cls", "mean": "mean", "lasttoken": "last"}  # sentence-transformers 6's pooling_mode
ST_SIMILARITY = {"dot": "dot", "cos": "cosine"}  # ours -> sentence-transformers' similarity_fn_name


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_sentence_transformers_files(model, root: str) -> None:
    """The module files that make a shared-tower BiEncoder folder a sentence-transformers model too."""
    config = model.config
    max_length = config.passage_max_length or getattr(model.tokenizer, "model_max_length", 512) or 512
    modules = [{"idx": 0, "name": "0", "path": "query_encoder", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(root, "2_Normalize"), exist_ok=True)
    pooling = {"word_embedding_dimension": model.query_encoder.config.hidden_size, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True,
               **{key: config.pooling == name for name, key in ST_POOLING.items()}}
    st_config = {"similarity_fn_name": ST_SIMILARITY[config.similarity]}
    if config.prompts:  # encode(texts, prompt_name="query"); "document" is what encode_document looks up
        prompts = dict(config.prompts)
        if "passage" in prompts:
            prompts["document"] = prompts["passage"]
        st_config.update(prompts=prompts, default_prompt_name=None)
    files = {"modules.json": modules, "1_Pooling/config.json": pooling,
             "query_encoder/sentence_bert_config.json": {"max_seq_length": min(int(max_length), 512),
                                                         "do_lower_case": False},
             "config_sentence_transformers.json": st_config}
    for rel, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            json.dump(content, f, indent=2)


def read_sentence_transformers_folder(path: str) -> dict | None:
    """What a local sentence-transformers folder says of itself: {"encoder": the transformer's folder, "pooling",
    "normalize", "similarity", "max_seq_length", "prompts"}; None for a folder that is not one (or a BiEncoder's,
    which loads as itself)."""
    if not os.path.isfile(os.path.join(path, "modules.json")):
        return None
    root_config = os.path.join(path, "config.json")
    if os.path.isfile(root_config) and _read_json(root_config).get("model_type") == "contaccum_biencoder":
        return None
    modules = _read_json(os.path.join(path, "modules.json"))
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    if "Transformer" not in kinds or "Pooling" not in kinds:
        return None
    encoder = os.path.join(path, kinds["Transformer"]["path"])
    pooling_config = _read_json(os.path.join(path, kinds["Pooling"]["path"], "config.json"))
    pooling = next((name for name, key in ST_POOLING.items() if pooling_config.get(key)), None) or \
        ST_POOLING_MODE.get(pooling_config.get("pooling_mode"))  # sentence-transformers 6 writes one name
    if pooling is None:
        raise ValueError(f"{path}: its Pooling module ({pooling_config}) is none of {tuple(ST_POOLING)}, the "
                         "poolings a BiEncoder has")
    st_config_path = os.path.join(path, "config_sentence_transformers.json")
    st_config = _read_json(st_config_path) if os.path.isfile(st_config_path) else {}
    similarity = {v: k for k, v in ST_SIMILARITY.items()}.get(st_config.get("similarity_fn_name") or "cosine")
    bert_config = os.path.join(encoder, "sentence_bert_config.json")
    prompts = st_config.get("prompts") or {}
    prompts = {side: prompts[key] for side, key in (("query", "query"), ("passage", "document"), ("passage", "passage"))
               if prompts.get(key)}
    max_length = _read_json(bert_config).get("max_seq_length") if os.path.isfile(bert_config) else None
    tokenizer_config = os.path.join(encoder, "tokenizer_config.json")
    if max_length is None and os.path.isfile(tokenizer_config):  # sentence-transformers 6 keeps it there
        max_length = _read_json(tokenizer_config).get("model_max_length")
        max_length = max_length if isinstance(max_length, int) and max_length < 10**6 else None  # (1e30: unset)
    return {"encoder": encoder, "pooling": pooling, "normalize": "Normalize" in kinds,
            "similarity": similarity or "cos", "prompts": prompts, "max_seq_length": max_length}


def saved_tokenizer(source: str):
    """The tokenizer saved beside a model's weights, or None where none was saved. A local folder is looked at first:
    asked for a tokenizer a folder lacks, transformers may fail in ways that also mean a broken one, and a broken
    tokenizer must not pass for a missing one."""
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, name)) for name in ("tokenizer_config.json", "tokenizer.json")):
            return None
        return AutoTokenizer.from_pretrained(source)
    try:  # a hub repository: only asking tells
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None


def model_name_for_card(name_or_path) -> str | None:
    """A hub id or model name for a card's base_model, never a local path: a hub id as it is; for a local folder,
    the hub id its own README's usage snippet loads (when it matches the README's title), else that title, else
    the folder's name."""
    if name_or_path is None:
        return None
    name_or_path = str(name_or_path)
    if not os.path.isdir(name_or_path):
        return name_or_path
    title, ids = None, []
    readme = os.path.join(name_or_path, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        body = text.split("---", 2)[-1] if text.startswith("---") else text
        title = next((line[2:].strip() for line in body.splitlines() if line.startswith("# ")), None)
        ids = re.findall(r"""(?:from_pretrained|SentenceTransformer)\(\s*['"]([\w.-]+/[\w.-]+)['"]""", text)
    for hub_id in ids:
        if title and hub_id.split("/")[-1] == title:
            return hub_id
    return title or os.path.basename(os.path.normpath(name_or_path))

"""A trained model as MTEB runs one: mteb.evaluate(MTEBModel(model), tasks).

    import mteb
    from hf_contaccum.retrieval.mteb import MTEBModel

    model = MTEBModel("path/to/saved/model")          # a BiEncoder or sentence-transformers folder, or the model
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))   # needs the hub for the task's data

mteb hands each batch with a prompt type: queries go through the query tower with the query prompt, documents
(and anything without a type) through the passage tower with the passage prompt; scores are the model's own
similarity. docs/mining-and-search.md#mteb.
"""
from __future__ import annotations

import numpy as np

from .encoders import as_encoder


class MTEBModel:
    """mteb's encoder protocol (encode, similarity, similarity_pairwise, mteb_model_meta) over an Encoder."""

    def __init__(self, model, batch_size: int = 64, name: str | None = None, revision: str | None = None):
        self.encoder = as_encoder(model, batch_size)
        self.mteb_model_meta = _meta(self.encoder, name or f"hf_contaccum/{_short(self.encoder.name)}", revision)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        kind = getattr(prompt_type, "value", prompt_type)
        encode = self.encoder.encode_queries if kind == "query" else self.encoder.encode_passages
        return encode(texts)

    def similarity(self, embeddings1, embeddings2):
        """Every pair's score: vectors come prepared for the similarity, so it is their inner product."""
        return np.asarray(embeddings1, np.float32) @ np.asarray(embeddings2, np.float32).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        return np.einsum("nd,nd->n", np.asarray(embeddings1, np.float32), np.asarray(embeddings2, np.float32))


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1] or "model"


def _meta(encoder, name: str, revision):
    from mteb.models import ModelMeta

    model = encoder.model
    config = getattr(model, "config", None)
    parameters = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    return ModelMeta(
        loader=None, name=name if "/" in name else f"hf_contaccum/{name}", revision=revision or "local",
        release_date=None, languages=None, n_parameters=parameters, memory_usage_mb=None,
        max_tokens=getattr(config, "passage_max_length", None), embed_dim=None, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine" if encoder.similarity == "cos" else "dot", use_instructions=False,
        training_datasets=None)

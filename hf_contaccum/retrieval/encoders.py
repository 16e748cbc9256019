"""One face for every model the retrieval tools take: a BiEncoder, a SentenceTransformer, or a folder of either.

encode_queries / encode_passages give float32 numpy vectors, already as the similarity compares them (unit
length for cosine), so that every score is an inner product (FAISS's IndexFlatIP). Queries go through the
query tower with the query prompt, passages through the passage tower with the passage prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..settings import normalize


@dataclass
class Encoder:
    """A model's two encode functions, giving float32 numpy vectors ready for inner-product search; make one with
    as_encoder."""

    model: object
    similarity: str  # "cos" or "dot"
    name: str
    batch_size: int = 64
    show_progress: bool = False

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """(len texts, d) vectors of queries: the query tower, the query prompt."""
        return self._encode(texts, "query")

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """(len texts, d) vectors of passages: the passage tower, the passage prompt."""
        return self._encode(texts, "passage")

    def _encode(self, texts, side) -> np.ndarray:
        if hasattr(self.model, "encode_queries"):  # a BiEncoder: its towers, prompts and training lengths
            encode = self.model.encode_queries if side == "query" else self.model.encode_passages
            vectors = encode(list(texts), batch_size=self.batch_size, show_progress=self.show_progress)
        else:  # a SentenceTransformer: encode_query / encode_document apply its prompts
            encode = self.model.encode_query if side == "query" else self.model.encode_document
            vectors = torch.as_tensor(encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                             show_progress_bar=self.show_progress))
        return normalize(vectors, self.similarity).numpy().astype(np.float32)


def as_encoder(model, batch_size: int = 64, show_progress: bool = False) -> Encoder:
    """An Encoder for a BiEncoder, a SentenceTransformer, an Encoder, or a path: a saved BiEncoder or
    sentence-transformers folder, or any other encoder checkpoint (loaded as a BiEncoder, mean pooling)."""
    if isinstance(model, Encoder):
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..model.biencoder import BiEncoder

        path = str(model)
        model = BiEncoder.from_pretrained(path) if _is_biencoder(path) else BiEncoder.from_encoder(path)
        name = path
    else:
        name = getattr(getattr(model, "config", None), "base_model_name", None) or type(model).__name__
    if hasattr(model, "encode_queries"):
        similarity = model.config.similarity
    else:
        function = getattr(model, "similarity_fn_name", None) or "cosine"
        if function not in ("cosine", "dot"):
            raise ValueError(f"the model scores with {function!r}: the retrieval tools search by inner product, "
                             "so they take models scored by cosine or dot product")
        similarity = "cos" if function == "cosine" else "dot"
    return Encoder(model, similarity, str(name), batch_size, show_progress)


def _is_biencoder(path: str) -> bool:
    import json

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "contaccum_biencoder"

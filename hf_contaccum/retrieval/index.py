"""Inner-product search over a corpus, built and searched one chunk at a time.

A corpus larger than memory for its vectors is encoded a chunk at a time; each chunk gets its own FAISS
index, every query is searched in it, and the running top k are merged (ties by the lower corpus
position, so the result is the same whatever the chunk size). "flat" is exact; "ivf" and "hnsw" are
FAISS's approximate indexes, for corpora where exact search is too slow.
"""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "could not load AVX512": noise
    import faiss

    return faiss


def build_index(vectors: np.ndarray, kind: str = "flat"):
    """A FAISS inner-product index over `vectors` (on every GPU faiss sees, for "flat")."""
    if kind not in KINDS:
        raise ValueError(f"index must be one of {KINDS}, got {kind!r}")
    faiss = _faiss()
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
    elif kind == "ivf":
        lists = max(1, min(int(math.sqrt(n)), n // 39 or 1))  # FAISS wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, lists // 8)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    index.add(vectors)
    return index


def merge_top_k(best, scores: np.ndarray, positions: np.ndarray, k: int):
    """The k best of two candidate lists per query, (scores, positions) each (n, *): by score, then position."""
    if best is not None:
        scores, positions = np.concatenate([best[0], scores], 1), np.concatenate([best[1], positions], 1)
    scores = np.where(positions < 0, -np.inf, scores)
    order = np.lexsort((positions, -scores), axis=1)[:, :k]  # score descending, then the lower position
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


def search_chunks(queries: np.ndarray, chunks, k: int, kind: str = "flat"):
    """(scores, corpus positions), each (queries, k), best first, over `chunks`: an iterable of (vectors, offset),
    each chunk's first corpus position. Positions past the corpus's end are -1 with score -inf."""
    best = None
    for vectors, offset in chunks:
        if len(vectors) == 0:
            continue
        scores, found = build_index(vectors, kind).search(queries, min(k, len(vectors)))
        best = merge_top_k(best, scores, np.where(found >= 0, found + offset, -1), k)
    if best is None or best[0].shape[1] < k:  # fewer passages than k
        missing = k - (0 if best is None else best[0].shape[1])
        pad = (np.full((len(queries), missing), -np.inf, np.float32), np.full((len(queries), missing), -1))
        best = pad if best is None else (np.concatenate([best[0], pad[0]], 1), np.concatenate([best[1], pad[1]], 1))
    return best


class CorpusIndex:
    """A corpus encoded once, in shards of at most `chunk_size` passages, with its ids and the encoder's similarity:
    saved to a folder (shard_00000.npy, ..., ids.json, index.json) and searched shard by shard."""

    def __init__(self, folder: str, ids: list, similarity: str, model: str, kind: str, shards: int):
        self.folder, self.ids, self.similarity, self.model, self.kind, self.shards = \
            folder, ids, similarity, model, kind, shards

    @classmethod
    def build(cls, encoder, corpus: dict, folder: str, chunk_size: int = 100_000, kind: str = "flat") -> CorpusIndex:
        os.makedirs(folder, exist_ok=True)
        ids, texts = list(corpus), list(corpus.values())
        shards = 0
        for start in range(0, len(texts), chunk_size):
            np.save(os.path.join(folder, f"shard_{shards:05d}.npy"), encoder.encode_passages(texts[start:start + chunk_size]))
            shards += 1
        with open(os.path.join(folder, "ids.json"), "w", encoding="utf-8") as f:
            json.dump(ids, f)
        meta = {"similarity": encoder.similarity, "model": encoder.name, "kind": kind, "shards": shards,
                "chunk_size": chunk_size, "passages": len(ids)}
        with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        return cls(folder, ids, encoder.similarity, encoder.name, kind, shards)

    @classmethod
    def load(cls, folder: str) -> CorpusIndex:
        meta_path = os.path.join(folder, "index.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{folder} is not a corpus index (no index.json): build one with contaccum-index")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(folder, "ids.json"), encoding="utf-8") as f:
            ids = json.load(f)
        return cls(folder, ids, meta["similarity"], meta["model"], meta["kind"], meta["shards"])

    def _chunks(self):
        offset = 0
        for shard in range(self.shards):
            vectors = np.load(os.path.join(self.folder, f"shard_{shard:05d}.npy"), mmap_mode="r")
            yield np.ascontiguousarray(vectors), offset
            offset += len(vectors)

    def search(self, encoder, queries: dict, k: int = 100) -> dict:
        """{query id: {passage id: score}} of the k best passages per query."""
        if encoder.similarity != self.similarity:
            raise ValueError(f"the index was built with {self.similarity!r} similarity, the encoder scores with "
                             f"{encoder.similarity!r}: search with the model that built it")
        qids = list(queries)
        scores, positions = search_chunks(encoder.encode_queries([queries[q] for q in qids]), self._chunks(), k,
                                          self.kind)
        return {qid: {self.ids[p]: float(s) for s, p in zip(row_s, row_p) if p >= 0}
                for qid, row_s, row_p in zip(qids, scores, positions)}

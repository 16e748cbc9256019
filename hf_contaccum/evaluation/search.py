"""Exact inner-product search with FAISS (on every GPU when faiss has them)."""
from __future__ import annotations

import logging

import numpy as np


def exact_search(queries: np.ndarray, passages: np.ndarray, k: int):
    # faiss logs at INFO that it could not load its AVX2/AVX512 build: noise, not an error
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    index = faiss.IndexFlatIP(passages.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(passages)
    return index.search(queries, min(k, passages.shape[0]))

"""Hard-negative mining: for each (query, positive) pair, the passages the model ranks high that are not relevant.

The same steps and option names as sentence-transformers' util.mine_hard_negatives (tests/test_mining.py finds
the same negatives with both): the corpus is the given passages plus the positives, one entry per distinct text;
each query's top candidates are found by inner product (FAISS, exact by default, chunk by chunk: memory stays
bounded by corpus_chunk_size); the query itself and every positive of the query (by text, or by id) are never
negatives; then the false-negative filters (a cross-encoder's re-score, an absolute or relative margin below the
positive's score, an absolute score ceiling or floor); then the ranks range_min to range_max of what is left, of
which the top num_negatives (or a seeded random sample) are kept. Rows that get fewer than num_negatives are
dropped (n-tuple) or get fewer rows (triplet). Why each filter: docs/mining-and-search.md.
"""
from __future__ import annotations

import random

import numpy as np

from ..data.columns import ColumnMap
from .encoders import as_encoder
from .index import search_chunks


def mine_hard_negatives(dataset, model, corpus=None, *, num_negatives: int = 3, range_min: int = 0,
                        range_max: int | None = None, max_score: float | None = None, min_score: float | None = None,
                        absolute_margin: float | None = None, relative_margin: float | None = None,
                        sampling_strategy: str = "top", cross_encoder=None, output_format: str = "n-tuple",
                        batch_size: int = 64, corpus_chunk_size: int = 100_000, index: str = "flat", seed: int = 0,
                        show_progress: bool = True):
    """A datasets.Dataset of `dataset`'s (query, positive) rows with hard negatives: negative_1..n columns
    ("n-tuple", with negative_i_id where the corpus has ids) or one row per negative ("triplet", a "negative"
    column). model: a BiEncoder, a SentenceTransformer or a folder of either. corpus: {id: text}, a list of texts, or
    None (the positives themselves)."""
    from datasets import Dataset

    if num_negatives < 1 or range_min < 0 or sampling_strategy not in ("top", "random"):
        raise ValueError(f"num_negatives >= 1, range_min >= 0 and sampling_strategy 'top' or 'random', got "
                         f"{num_negatives}, {range_min}, {sampling_strategy!r}")
    if output_format not in ("n-tuple", "triplet"):
        raise ValueError(f"output_format must be 'n-tuple' or 'triplet', got {output_format!r}")
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError("the dataset is empty: give it at least one (query, positive) row")
    columns = ColumnMap.from_columns(rows[0].keys(), "the dataset to mine")
    texts, ids = _corpus(corpus, [r[columns.positive] for r in rows], [r.get("positive_id") for r in rows])
    position = {text: i for i, text in enumerate(texts)}
    queries = list(dict.fromkeys(r[columns.query] for r in rows))
    query_index = {q: i for i, q in enumerate(queries)}
    positives = [[] for _ in queries]  # per query, the corpus positions of its positives
    by_id = {str(i): p for p, i in enumerate(ids)} if ids is not None else {}
    for row in rows:
        spot = by_id.get(str(row.get("positive_id")), position[row[columns.positive]])
        if spot not in positives[query_index[row[columns.query]]]:
            positives[query_index[row[columns.query]]].append(spot)
    most = max(len(p) for p in positives)
    filtered = any(v is not None for v in (absolute_margin, relative_margin, max_score)) or (
        cross_encoder is not None and min_score is not None)
    range_max = range_max if range_max is not None else range_min + num_negatives * (10 if filtered else 1) + most
    if range_min >= range_max or num_negatives > range_max - range_min:
        raise ValueError(f"ranks {range_min} to {range_max} hold fewer than num_negatives={num_negatives} candidates")
    encoder = as_encoder(model, batch_size, show_progress)
    query_vectors = encoder.encode_queries(queries)
    chunks = ((encoder.encode_passages(texts[s:s + corpus_chunk_size]), s)
              for s in range(0, len(texts), corpus_chunk_size))
    scores, found = search_chunks(query_vectors, chunks, range_max + most + 1, index)
    flat = [p for group in positives for p in group]
    positive_vectors = encoder.encode_passages([texts[p] for p in flat])
    owner = np.repeat(np.arange(len(queries)), [len(p) for p in positives])
    positive_scores = np.einsum("nd,nd->n", query_vectors[owner], positive_vectors)
    if cross_encoder is not None:
        scores, positive_scores = _rescore(cross_encoder, queries, texts, found, scores, owner, flat, batch_size)
    scores = np.where(found < 0, -np.inf, scores)
    same_text = {}  # a corpus may hold one text under several ids: none of them is a negative of its query
    for p, text in enumerate(texts):
        same_text.setdefault(text, []).append(p)
    for q, query in enumerate(queries):  # the query itself, and every positive of it, are never negatives
        excluded = {s for p in positives[q] for s in same_text[texts[p]]} | set(same_text.get(query, []))
        scores[q, np.isin(found[q], list(excluded))] = -np.inf
    lowest_positive = np.array([min(positive_scores[owner == q]) for q in range(len(queries))])
    if absolute_margin is not None:
        scores[scores + absolute_margin > lowest_positive[:, None]] = -np.inf
    if relative_margin is not None:
        scores[scores > (lowest_positive - np.abs(lowest_positive) * relative_margin)[:, None]] = -np.inf
    if max_score is not None:
        scores[scores > max_score] = -np.inf
    if min_score is not None:
        scores[scores < min_score] = -np.inf
    order = np.lexsort((found, -scores), axis=1)[:, :range_max][:, range_min:]  # best first, then lower position
    scores, found = np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)
    rng = random.Random(seed)
    picked = [_pick(s, f, num_negatives, sampling_strategy, rng) for s, f in zip(scores, found)]
    return Dataset.from_list(_rows(rows, columns, query_index, picked, texts, ids, num_negatives, output_format))


def _corpus(corpus, positive_texts, positive_ids):
    """(texts, ids or None): the corpus and the positives, one entry per distinct text, in order of appearance."""
    if isinstance(corpus, dict):
        texts, ids = list(corpus.values()), list(corpus)
    elif corpus is None and any(i is not None for i in positive_ids):  # the positives, with the ids they have
        texts, ids = [], []
    else:
        texts, ids = list(corpus or []), None
    seen = dict.fromkeys(texts)
    extra = [t for t in dict.fromkeys(positive_texts) if t not in seen]
    if ids is not None:  # a positive outside the corpus: its own id, or its text as one
        first_id = dict(zip(positive_texts, positive_ids))
        ids = ids + [str(first_id.get(t) or t) for t in extra]
    return texts + extra, ids


def _rescore(cross_encoder, queries, texts, found, scores, owner, flat, batch_size):
    """The cross-encoder's scores for every candidate and every (query, positive) pair."""
    rescored = np.full(scores.shape, -np.inf, np.float32)
    for q, query in enumerate(queries):
        valid = found[q] >= 0
        pairs = [(query, texts[p]) for p in found[q][valid]]
        rescored[q, valid] = np.asarray(cross_encoder.predict(pairs, batch_size=batch_size), np.float32).reshape(-1)
    positive_pairs = [(queries[q], texts[p]) for q, p in zip(owner, flat)]
    return rescored, np.asarray(cross_encoder.predict(positive_pairs, batch_size=batch_size), np.float32).reshape(-1)


def _pick(scores, found, count, strategy, rng) -> list[int]:
    """Corpus positions of the chosen negatives, best first; fewer than `count` when too few are left."""
    valid = [int(f) for s, f in zip(scores, found) if np.isfinite(s)]
    if strategy == "random" and len(valid) > count:
        chosen = set(rng.sample(range(len(valid)), count))
        valid = [f for i, f in enumerate(valid) if i in chosen]
    return valid[:count]


def _rows(rows, columns, query_index, picked, texts, ids, count, output_format):
    out = []
    for row in rows:
        negatives = picked[query_index[row[columns.query]]]
        base = {columns.query: row[columns.query], columns.positive: row[columns.positive]}
        if row.get("positive_id") is not None:
            base["positive_id"] = row["positive_id"]
        if output_format == "triplet":
            out += [{**base, "negative": texts[p], **({"negative_id": ids[p]} if ids else {})} for p in negatives]
        elif len(negatives) == count:
            for i, p in enumerate(negatives, 1):
                base[f"negative_{i}"] = texts[p]
                if ids:
                    base[f"negative_{i}_id"] = ids[p]
            out.append(base)
    if not out:
        raise ValueError("no row found enough negatives: loosen the filters (range_max, the margins, max_score) or "
                         "ask for fewer num_negatives")
    return out

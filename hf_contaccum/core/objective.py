"""The contrastive objective beyond query -> passage: sentence-transformers' directions, partition modes,
hardness weighting and any similarity function, over the current batch and the memory bank.

Every row is a (query, positive) pair, current or banked. Its candidates, per direction:
  query_to_doc    its query against every passage (positives and hard negatives, current and banked);
  query_to_query  its query against every other query;
  doc_to_query    its positive against every query (its own included);
  doc_to_doc      its positive against every passage of other pairs.
"joint" takes one log-sum-exp over the union, "per_direction" the mean of one per direction; the target
is the pair's own query -> positive logit. Hardness weighting adds strength x stop_grad(similarity) to
the query_to_doc logits of the chosen negatives (other pairs' passages, the row's own hard negatives,
or both). A banked row's candidates in the bank are constants: they are computed here each
micro-batch (no incremental cache: the query -> passage default has one, BankLogsumexp). The formulas
and a literal reference: docs/how-it-works.md#directions-and-hardness.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import score
from .lse_cache import NEG_INF

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
BLOCK_FLOATS = 2**21  # banked rows x banked candidates, computed in blocks of this many logits


@dataclass(frozen=True)
class Objective:
    directions: tuple = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0

    def __post_init__(self):
        directions = tuple(self.directions)
        if not directions or set(directions) - set(DIRECTIONS) or "query_to_doc" not in directions:
            raise ValueError(f"directions must include 'query_to_doc' and only {DIRECTIONS}, got {directions}")
        if self.partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {self.partition_mode!r}")
        if self.partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError("partition_mode='per_direction' needs every direction's candidates to hold the positive "
                             "pair; 'query_to_query' and 'doc_to_doc' do not: use partition_mode='joint'")
        if self.hardness_mode not in HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {self.hardness_mode!r}")
        if self.hardness_strength < 0:
            raise ValueError(f"hardness_strength must be >= 0, got {self.hardness_strength}")
        object.__setattr__(self, "directions", directions)

    @property
    def is_default(self) -> bool:
        return self.directions == ("query_to_doc",) and self.partition_mode == "joint" and not self.hardened

    @property
    def hardened(self) -> bool:
        return self.hardness_mode is not None and self.hardness_strength > 0


@dataclass
class Side:
    """A set of candidates: vectors (c, d), keys (c,), owner (c,) = the pair each belongs to, and, for passages,
    which of them are positives (the rest are hard negatives)."""
    vectors: torch.Tensor
    keys: torch.Tensor
    owner: torch.Tensor
    positive: torch.Tensor


def _lse(logits: torch.Tensor) -> torch.Tensor:
    return logits.logsumexp(-1) if logits.shape[-1] else logits.new_full(logits.shape[:-1], NEG_INF)


def row_terms(objective: Objective, rows_q, rows_d, rows_key, rows_owner, docs: Side, queries: Side, similarity,
              temperature: float, mask: bool) -> dict:
    """{direction: (R,) log-sum-exp} of rows (query vectors rows_q, positives rows_d, their key and owner) over the
    candidates `docs` and `queries`, with masks and hardness; plus "target" when the rows' positives are among the
    docs (the current batch) and "own_doc" where the candidates hold the rows' own positives."""
    out = {}
    same_key = (lambda cand: cand.keys[None] == rows_key[:, None]) if mask else (lambda cand: None)
    own_doc = docs.owner[None] == rows_owner[:, None]
    for direction in objective.directions:
        row_vec = rows_q if direction.startswith("query") else rows_d
        cand = docs if direction.endswith("doc") else queries
        sim = score(row_vec, cand.vectors, similarity)
        logits = sim / temperature
        drop = same_key(cand)
        if direction == "query_to_doc":
            keep = own_doc & docs.positive[None]  # each row keeps its own positive
            if drop is not None:
                drop = drop & ~keep
            if objective.hardened:
                mode = objective.hardness_mode
                penalised = {"in_batch_negatives": ~own_doc, "hard_negatives": own_doc & ~docs.positive[None],
                             "all_negatives": ~keep}[mode]
                logits = logits + objective.hardness_strength * sim.detach() * penalised
        else:
            own = cand.owner[None] == rows_owner[:, None]
            if direction == "doc_to_query":  # its own query stays (it is the positive pair)
                drop = drop & ~own if drop is not None else None
            else:  # query_to_query: not itself; doc_to_doc: none of its own pair's passages
                drop = own if drop is None else drop | own
        if drop is not None:
            logits = logits.masked_fill(drop, NEG_INF)
        out[direction] = _lse(logits)
    return out


def combine(objective: Objective, parts: list[dict]) -> torch.Tensor:
    """Each row's log-partition from its per-direction log-sum-exps over several candidate sets (current, bank)."""
    per_direction = [torch.stack([p[d] for p in parts]).logsumexp(0) for d in objective.directions]
    stacked = torch.stack(per_direction)
    return stacked.logsumexp(0) if objective.partition_mode == "joint" else stacked.mean(0)


@torch.no_grad()
def banked_terms(objective: Objective, bank, rows, docs: Side, queries: Side, similarity, temperature, mask) -> dict:
    """row_terms of banked rows `rows` (slots) over the bank's own candidates, in blocks of rows (constants)."""
    rows = torch.arange(bank.fill, device=bank.queries.device)[rows] if isinstance(rows, slice) else rows
    per_row = max(1, docs.vectors.shape[0] + queries.vectors.shape[0])
    step = max(1, BLOCK_FLOATS // per_row)
    blocks = [row_terms(objective, bank.queries[r], bank.passages[r], bank.passage_keys[r], r + OWNER_OFFSET,
                        docs, queries, similarity, temperature, mask)
              for r in (rows[s:s + step] for s in range(0, len(rows), step))]
    return {d: torch.cat([b[d] for b in blocks]) for d in objective.directions}


OWNER_OFFSET = 1 << 40  # banked pairs' owners: slot + this, never a current pair's index


def bank_sides(bank) -> tuple[Side, Side]:
    """The bank's passages (positives, then banked hard negatives) and its queries, as candidates."""
    vecs, keys = bank.columns()
    slots = torch.arange(bank.fill, device=keys.device) + OWNER_OFFSET
    width = keys.shape[1]
    positive = torch.zeros(bank.fill, width, dtype=torch.bool, device=keys.device)
    positive[:, 0] = True
    docs = Side(vecs.flatten(0, 1), keys.flatten(), slots[:, None].expand(-1, width).flatten(), positive.flatten())
    queries = Side(bank.queries[:bank.fill], bank.passage_keys[:bank.fill], slots,
                   torch.ones(bank.fill, dtype=torch.bool, device=keys.device))
    return docs, queries


def extended_infonce(loss, q, queries_all, passages, passage_keys, hard_negatives, hard_negative_keys, use_bank,
                     rank, world_size):
    """ContAccumLoss._infonce for an objective other than the default or a similarity function: the same rows,
    banked rows and distributed mean, with every direction's candidates. Returns (mean loss, (candidates, banked
    candidates), the tensors whose backward reads the bank)."""
    objective, sim, tau, mask, bank = loss.objective, loss.similarity, loss.temperature, loss.mask_false_negatives, \
        loss.bank
    n, total_pairs = q.shape[0], passages.shape[0]
    device = q.device
    pairs = torch.arange(total_pairs, device=device)
    docs_vec, docs_key, owner = [passages], [passage_keys], [pairs]
    if hard_negatives is not None:
        h = hard_negatives.shape[1]
        docs_vec.append(hard_negatives.flatten(0, 1))
        docs_key.append(hard_negative_keys.flatten())
        owner.append(pairs.repeat_interleave(h))
    positive = torch.zeros(sum(v.shape[0] for v in docs_vec), dtype=torch.bool, device=device)
    positive[:total_pairs] = True
    docs = Side(torch.cat(docs_vec), torch.cat(docs_key), torch.cat(owner), positive)
    queries = Side(queries_all, passage_keys, pairs, torch.ones(total_pairs, dtype=torch.bool, device=device))
    own = slice(rank * n, rank * n + n)
    banked = use_bank and bank.fill > 0
    bank_docs, bank_queries = bank_sides(bank) if banked else (None, None)
    rows_d, rows_key, rows_owner = passages[own], passage_keys[own], pairs[own]
    parts = [row_terms(objective, q, rows_d, rows_key, rows_owner, docs, queries, sim, tau, mask)]
    if banked:
        parts.append(row_terms(objective, q, rows_d, rows_key, rows_owner, bank_docs, bank_queries, sim, tau, mask))
    targets = (q * rows_d).sum(-1) if sim in ("dot", "cos") else torch.diagonal(score(q, rows_d, sim))
    total = (combine(objective, parts) - targets / tau).sum()
    num_rows = counted = n * world_size
    if banked and loss.query_bank_size > 0:
        if loss.query_bank_size >= bank.fill:
            rows, total_bank_rows = slice(rank, bank.fill, world_size), bank.fill
        else:
            newest = bank.newest(loss.query_bank_size)
            rows, total_bank_rows = newest[rank::world_size], len(newest)
        slots = torch.arange(bank.fill, device=device)[rows] if isinstance(rows, slice) else rows
        num_rows += total_bank_rows  # this rank's banked rows and the other ranks' share
        if len(slots):
            bq, bd = bank.queries[slots], bank.passages[slots]
            current = row_terms(objective, bq, bd, bank.passage_keys[slots], slots + OWNER_OFFSET, docs, queries, sim,
                                tau, mask)
            constant = banked_terms(objective, bank, slots, bank_docs, bank_queries, sim, tau, mask)
            bank_targets = (bq * bd).sum(-1) if sim in ("dot", "cos") else torch.diagonal(score(bq, bd, sim))
            total = total + (combine(objective, [current, constant]) - bank_targets / tau).sum()
        counted += total_bank_rows
    candidates = docs.vectors.shape[0] + (bank_docs.vectors.shape[0] if banked else 0)
    readers = (q, docs.vectors) + ((queries.vectors,) if set(objective.directions) & {"query_to_query",
                                                                                     "doc_to_query"} else ())
    mean = (total * world_size if world_size > 1 else total) / num_rows
    return mean, counted, candidates, (bank_docs.vectors.shape[0] if banked else 0), readers

"""The paper's objective, query -> passage InfoNCE over the current batch and the bank, with the banked rows'
constant part read from the incremental log-sum-exp cache (docs/how-it-works.md). The other objectives:
objective.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..settings import score
from .inputs import LossStats
from .lse_cache import NEG_INF


def infonce(loss, queries, passages, passage_keys, hard_negatives, hard_negative_keys, use_bank, rank, world_size):
    """Mean InfoNCE over all rows, and the tensors whose backward reads the bank. With R processes the passages
    and keys are gathered (R*n rows, rank order): query i's positive is passages[rank*n + i]. Each rank counts its
    own query rows and every R-th banked row, scaled by R, so that DDP's gradient average is the gradient of the
    one global mean over R*n + banked rows."""
    q, p = loss.prepare(queries), loss.prepare(passages)  # q is never a leaf: forward aliased the queries
    n = q.shape[0]
    cols, keys = [p], [passage_keys]
    if hard_negatives is not None:
        cols.append(loss.prepare(hard_negatives).flatten(0, 1))
        keys.append(hard_negative_keys.flatten())
    cur_cols, cur_keys = torch.cat(cols), torch.cat(keys)
    bank = loss.bank
    banked = use_bank and bank.fill > 0
    own = slice(rank * n, rank * n + n)  # this rank's positives among the current columns
    targets = torch.arange(own.start, own.stop, device=q.device)
    logits, all_keys = score(q, cur_cols, loss.similarity) / loss.temperature, cur_keys
    if banked:  # banked columns: a separate product, so the bank is read in place, never copied
        bvecs, bkeys = bank.columns()
        logits = torch.cat([logits, q @ bvecs.flatten(0, 1).T / loss.temperature], 1)
        all_keys = torch.cat([cur_keys, bkeys.flatten()])
    masked = None
    if loss.mask_false_negatives:
        same = all_keys[None] == passage_keys[own][:, None]
        same[:, own].diagonal().fill_(False)  # each row keeps its own positive
        logits = logits.masked_fill(same, NEG_INF)
        masked = same.sum() if use_bank else None
    total = F.cross_entropy(logits, targets, reduction="sum")
    num_rows = counted = n * world_size  # every rank's current rows count in the global mean
    if banked and loss.query_bank_size > 0:
        if loss.query_bank_size >= bank.fill:
            rows, total_bank_rows = slice(rank, bank.fill, world_size), bank.fill  # a slice: no copy
        else:
            newest = bank.newest(loss.query_bank_size)
            rows, total_bank_rows = newest[rank::world_size], len(newest)
        num_bank_rows = len(range(*rows.indices(bank.size))) if isinstance(rows, slice) else len(rows)
        num_rows += total_bank_rows  # this rank's banked rows and the other ranks' share
        if num_bank_rows:
            # (banked rows, columns) logits: scaled on the small side and masked in place (the product's backward
            # does not read it), so the only banked-row temporaries are this one and logsumexp's
            cur_logits = bank.queries[rows] @ (cur_cols.T / loss.temperature)
            if loss.mask_false_negatives:
                cur_logits.masked_fill_(cur_keys[None] == bank.passage_keys[rows][:, None], NEG_INF)
            banked_lse = loss.cache.row_lse(bank, rows)  # cached: the row's banked columns, its positive included
            total = total + (torch.logaddexp(cur_logits.logsumexp(-1), banked_lse)
                             - loss.cache.row_positive_logit(rows)).sum()
        counted += total_bank_rows
    num_banked = logits.shape[1] - cur_cols.shape[0]
    stats = LossStats(counted, logits.shape[1], math.log(logits.shape[1]), num_banked, masked,
                      n * (logits.shape[1] - 1))
    # q @ banked columns saved the banked passages (for q's gradient); banked rows @ current columns saved the
    # banked queries (for the columns' gradient): once both gradients exist, the bank is free to change.
    return (total * world_size if world_size > 1 else total) / num_rows, stats, (q, cur_cols)

"""What ContAccumLoss reports about training: negatives per query, GradNormRatio, collapse.

Everything is summed on the device, from backward hooks where gradients are involved, and
read on the host only at logging steps (and, for the collapse guard, once per optimizer
step): no host sync per micro-batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLLAPSE_SPREAD = 1e-4  # total variance of unit vectors below which a batch counts as collapsed (random: ~1)
# A collapse in which the vectors still differ a little (measured: an encoder trained from scratch, whose loss
# returned to the log of its candidates and stayed there, its spread above COLLAPSE_SPREAD): the loss over its
# value when every candidate scores the same, above this for a step, after it had once been below LEARNED_LOSS.
UNIFORM_LOSS = 0.99
LEARNED_LOSS = 0.9
# A run that reads the memory bank and never leaves the uniform loss (measured: an encoder from scratch with a stale
# bank at lr 1e-4 never went below 0.93 x and stayed above UNIFORM_LOSS from about step 50 of 300) is stopped after
# this many times the patience: slower than a collapse after learning, since a run may start at the uniform loss.
# Healthy runs of ours stayed above UNIFORM_LOSS for at most 15 steps in a row (from scratch: gradient accumulation
# 3, GradCache 5, the refreshed bank 3, the bank moved by bank_drift_probe 2-7, once 15). On the stuck run the guard
# stopped at step 114.
STUCK_PATIENCE_FACTOR = 5


class EmbeddingCollapseError(RuntimeError):
    """Every embedding became the same vector: training cannot recover by itself."""


class TrainingDiagnostics:
    # GradNormRatios wait as (query norm, passage norm) pairs on the device and are reduced every this many: one op
    # per micro-batch instead of the eight of a guarded division and its sums (a GPU micro-step is launch-bound)
    PENDING_PAIRS = 64

    def __init__(self):
        self._sums: dict = {}  # logging statistics, since the last log line
        self._pending: dict = {}  # GradNormRatio name -> stacked (query norm, passage norm) pairs not yet summed
        self._window: dict = {}  # collapse statistics, since the last optimizer step
        self._collapsed_steps = 0
        self._stuck_steps = 0  # steps in a row at the uniform loss while reading the bank
        self._lowest_loss_ratio = float("inf")  # the lowest step mean of loss / uniform loss so far

    def _add(self, store: dict, key: str, value) -> None:
        store[key] = store.get(key, 0) + value

    def micro_batch(self, stats, queries, positives, loss) -> None:
        """One training micro-batch (stats: its LossStats): its candidates per query, how far apart its vectors
        are, and how far its loss is below the loss of scores that say nothing."""
        self._add(self._sums, "micro_batches", 1)
        self._add(self._sums, "negatives", stats.num_columns - 1)
        if queries.shape[0] < 2 or stats.uniform_loss <= 0:
            return
        with torch.no_grad():  # total variance of the unit vectors, the smaller side's: 0 when every vector is the same
            sides = torch.stack((queries.detach(), positives.detach())).float()  # one op per step for both sides
            spread = F.normalize(sides, dim=-1).var(1, unbiased=False).sum(-1).amin()
        self._add(self._window, "spread", spread)
        self._add(self._window, "loss_ratio", loss.detach().float() / stats.uniform_loss)
        self._add(self._window, "micro_batches", 1)
        self._add(self._window, "bank_read", int(stats.banked_columns > 0))

    def _add_ratio(self, key: str, query_norm, passage_norm) -> None:
        pending = self._pending.setdefault(key, [])
        pending.append(torch.stack((query_norm, passage_norm)))
        if len(pending) >= self.PENDING_PAIRS:
            self._sum_pending(key)

    def _sum_pending(self, key: str) -> None:
        """Add the pending pairs' ratios to the sums (a pair with a zero query norm has no ratio and is skipped)."""
        pairs = torch.stack(self._pending.pop(key))
        query_norm, passage_norm = pairs.unbind(1)
        ok = query_norm > 0
        self._add(self._sums, key, torch.where(ok, passage_norm / query_norm, 0.0).sum())
        self._add(self._sums, key + "_count", ok.sum())

    def record_grad_norm_ratio(self, query, passage) -> None:
        """GradNormRatio (paper §5.5) at the vectors the similarity compares (unit vectors with cosine, raw with
        dot product): norm of the gradient on the current passages (positives and hard negatives, every loss
        row counted, banked rows included) over that on the current queries. On unit vectors it does not
        depend on how long the encoder's raw query and passage vectors are."""
        self._add_ratio("ratio", *(torch.linalg.vector_norm(t, dtype=torch.float32) for t in (query, passage)))

    def track_raw_grad_norm_ratio(self, queries, positives, hard_negatives) -> None:
        """The same ratio at the encoder's raw output vectors, from hooks on them."""
        sides = [t for t in (queries, positives, hard_negatives) if t is not None]
        if not all(t.requires_grad for t in sides):
            return
        norms, num_sides = {}, len(sides)  # the hooks must not hold the tensors: a cycle through C++ leaks

        def hook(index):
            def record(grad):
                norms[index] = torch.linalg.vector_norm(grad, dtype=torch.float32)
                if len(norms) == num_sides:  # the query's and every passage-side gradient have arrived
                    passage = norms[1] if num_sides == 2 else torch.linalg.vector_norm(
                        torch.stack([norms[i] for i in range(1, num_sides)]))
                    self._add_ratio("raw_ratio", norms[0], passage)
            return record

        for index, t in enumerate(sides):
            t.register_hook(hook(index))

    def check_collapse(self, patience: int, threshold: float = COLLAPSE_SPREAD) -> None:
        """Call once per optimizer step: raises when the embeddings have been collapsed for `patience` steps in a
        row: every vector the same (spread below `threshold`), or, once the run had learned something, a loss back
        at the log of the number of candidates (every candidate scored alike). A run that has not yet left that
        loss (an encoder from scratch, early on) is stopped only if it reads the memory bank at every micro-batch
        and stays there for STUCK_PATIENCE_FACTOR x `patience` steps (stuck)."""
        window, self._window = self._window, {}
        if patience <= 0 or not window.get("micro_batches"):
            return
        spread, ratio = (float(window[key]) / window["micro_batches"] for key in ("spread", "loss_ratio"))
        at_uniform = ratio > UNIFORM_LOSS
        uniform = at_uniform and self._lowest_loss_ratio < LEARNED_LOSS
        self._lowest_loss_ratio = min(self._lowest_loss_ratio, ratio)
        self._collapsed_steps = self._collapsed_steps + 1 if spread < threshold or uniform else 0
        stuck = at_uniform and window["bank_read"] == window["micro_batches"]
        self._stuck_steps = self._stuck_steps + 1 if stuck else 0
        if self._collapsed_steps >= patience:
            steps = self._collapsed_steps
            what = (f"every query and passage vector was the same (spread {spread:.2e} < {threshold:g})"
                    if spread < threshold else
                    f"the loss was {ratio:.3f} x its value when every candidate scores the same, after it had been "
                    f"{self._lowest_loss_ratio:.3f} x (the vectors differ by so little that no passage stands out)")
        elif self._stuck_steps >= STUCK_PATIENCE_FACTOR * patience:
            steps = self._stuck_steps
            what = (f"the loss was {ratio:.3f} x its value when every candidate scores the same while reading the "
                    f"memory bank, and never below {self._lowest_loss_ratio:.3f} x: the bank keeps every vector "
                    "from separating (measured from scratch, where gradient accumulation never stayed at that "
                    "loss for more than 3 steps in a row)")
        else:
            return
        raise EmbeddingCollapseError(
            f"the embeddings have collapsed: for {steps} optimizer steps {what}, so the loss sits at the log "
            "of the number of candidates and nothing is learned. Stopped before saving a collapsed checkpoint. "
            "Usual causes and fixes: an encoder that moves fast against a stale bank (from scratch, random "
            "weights, a high learning rate: set bank_drift_probe=8 (cheap: the bank follows the encoder's common "
            "drift), bank_refresh_steps=1, or use GradCache: memory_bank_size=0 with gradcache_chunk_size), a "
            "passage-only bank (query_memory_bank_size=0) or a bank much larger than one optimizer step (use "
            "memory_bank_size about per_device_train_batch_size x gradient_accumulation_steps), a learning rate "
            "too high (lower it, add warm-up), a temperature too low for dot product (use similarity='cos' with "
            "temperature 0.05). collapse_patience=0 turns this check off.")

    def pop(self, bank_fill: int) -> dict:
        """Means since the last call, for a log line: negatives per query, the GradNormRatios; the bank fill."""
        for key in list(self._pending):
            self._sum_pending(key)
        sums, self._sums = self._sums, {}
        if not sums.get("micro_batches"):
            return {}
        logs = {"bank_fill": bank_fill, "negatives_per_query": sums["negatives"] / sums["micro_batches"]}
        for key, name in (("ratio", "grad_norm_ratio"), ("raw_ratio", "grad_norm_ratio_raw")):
            count = float(sums.get(key + "_count", 0))
            if count:
                logs[name] = float(sums[key]) / count
        return logs

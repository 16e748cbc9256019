"""What ContAccumLoss reports about training: negatives per query, GradNormRatio, collapse.

Everything is summed on the device, from backward hooks where gradients are involved, and read on
the host only at logging steps (and, for the guard, once per optimizer step): no host sync per
micro-batch. The guard's rules and the runs they were measured on: docs/reliability.md#the-collapse-guard.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

COLLAPSE_SPREAD = 1e-4  # total variance of unit vectors below which a batch counts as collapsed (random: ~1)
UNIFORM_LOSS = 0.99  # loss / log(candidates) above which every candidate scores alike
LEARNED_LOSS = 0.9  # ... and below which the run had learned something
STUCK_PATIENCE_FACTOR = 5  # a run that never leaves the uniform loss, reading the bank: 5 x patience steps
# degeneration: the step's loss ratio, smoothed over SMOOTHING steps, this far above its lowest smoothed value (a
# warning), and for RISE_PATIENCE_FACTOR x patience steps this far (a stop); margins over the healthy runs replayed
# by benchmarks/collapse_guard.py (docs/reliability.md#the-collapse-guard)
SMOOTHING = 10
RISE_WARN, RISE_STOP, RISE_PATIENCE_FACTOR = 0.25, 0.35, 2


class EmbeddingCollapseError(RuntimeError):
    """The embeddings stopped telling texts apart: training cannot recover by itself."""


class NoNegativesError(ValueError):
    """Every candidate of every query was masked as a duplicate of its positive: the data has nothing to contrast."""


def _collapse_fixes() -> str:
    return ("Usual causes and fixes: an encoder that moves fast against a stale bank (from scratch, random weights, a "
            "high learning rate: set bank_drift_probe=8, bank_refresh_steps=1, or use GradCache: memory_bank_size=0 "
            "with gradcache_chunk_size), a passage-only bank (query_memory_bank_size=0) or a bank much larger than "
            "one optimizer step (use memory_bank_size about per_device_train_batch_size x "
            "gradient_accumulation_steps), a learning rate too high (lower it, add warm-up), a temperature too low "
            "for dot product (use similarity='cos' with temperature 0.05). collapse_patience=0 turns this check off; "
            "docs/reliability.md#the-collapse-guard.")


class TrainingDiagnostics:
    # GradNormRatios wait as (query norm, passage norm) pairs on the device and are reduced every this many: one op
    # per micro-batch instead of the eight of a guarded division and its sums (a GPU micro-step is launch-bound)
    PENDING_PAIRS = 64

    def __init__(self):
        self._sums: dict = {}  # logging statistics, since the last log line
        self._pending: dict = {}  # GradNormRatio name -> stacked (query norm, passage norm) pairs not yet summed
        self._window: dict = {}  # guard statistics, since the last optimizer step
        self._collapsed_steps = self._stuck_steps = self._alone_steps = 0
        self._lowest_loss_ratio = float("inf")  # the lowest step mean of loss / uniform loss so far
        self._smoothed = None  # the step ratio, exponentially smoothed over SMOOTHING steps
        self._lowest_smoothed = float("inf")
        self._rise_steps, self._warned_rise = 0, False

    def _add(self, store: dict, key: str, value) -> None:
        store[key] = store.get(key, 0) + value

    def micro_batch(self, stats, queries, positives, loss) -> None:
        """One training micro-batch (stats: its LossStats): its candidates per query, how far apart its vectors
        are, how far its loss is below the loss of scores that say nothing, and its rows left with no negative."""
        self._add(self._sums, "micro_batches", 1)
        self._add(self._sums, "negatives", stats.num_columns - 1)
        if stats.masked is not None:  # every candidate but the positives masked: nothing to contrast
            self._add(self._window, "masked", stats.masked)
            self._add(self._window, "maskable", stats.maskable)
        if queries.shape[0] < 2 or stats.uniform_loss <= 0:
            return
        with torch.no_grad():  # total variance of the unit vectors, the smaller side's: 0 when every vector is the same
            sides = torch.stack((queries.detach(), positives.detach())).float()  # one op per step for both sides
            spread = F.normalize(sides, dim=-1).var(1, unbiased=False).sum(-1).amin()
        self._add(self._window, "spread", spread)
        self._add(self._window, "loss_ratio", loss.detach().float() / stats.uniform_loss)
        self._add(self._window, "micro_batches", 1)
        self._add(self._window, "bank_read", int(stats.banked_columns > 0))

    def add_ratio(self, key: str, query_norm, passage_norm) -> None:
        """One (query norm, passage norm) pair of GradNormRatio `key` ("ratio", "raw_ratio", "towers"), on the device."""
        pending = self._pending.setdefault(key, [])
        pending.append(torch.stack((query_norm, passage_norm)))
        if len(pending) >= self.PENDING_PAIRS:
            self._sum_pending(key)

    def _sum_pending(self, key: str) -> None:
        """Add the pending pairs' ratios to the sums (a pair with a zero query norm has no ratio and is skipped)."""
        query_norm, passage_norm = torch.stack(self._pending.pop(key)).unbind(1)
        ok = query_norm > 0
        self._add(self._sums, key, torch.where(ok, passage_norm / query_norm, 0.0).sum())
        self._add(self._sums, key + "_count", ok.sum())

    def record_grad_norm_ratio(self, query, passage, key: str = "ratio") -> None:
        """GradNormRatio (paper §5.5): the norm of the gradient on the current passages over that on the current
        queries, at the vectors the similarity compares (unit vectors with cosine, raw with dot product)."""
        self.add_ratio(key, *(torch.linalg.vector_norm(t, dtype=torch.float32) for t in (query, passage)))

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
                    self.add_ratio("raw_ratio", norms[0], passage)
            return record

        for index, t in enumerate(sides):
            t.register_hook(hook(index))

    def check_collapse(self, patience: int, threshold: float = COLLAPSE_SPREAD) -> None:
        """Call once per optimizer step. Raises NoNegativesError when every query had no negative left for
        `patience` steps (duplicate texts, not a collapse); EmbeddingCollapseError when every vector was the
        same, or the loss was back at log(candidates) after the run had learned, for `patience` steps, or never
        left it while reading the bank for STUCK_PATIENCE_FACTOR x `patience`, or when the smoothed loss ratio
        climbed RISE_STOP above its lowest value for RISE_PATIENCE_FACTOR x `patience` (after a warning at
        RISE_WARN)."""
        window, self._window = self._window, {}
        if patience <= 0 or not window.get("micro_batches") and not window.get("maskable"):
            return
        if window.get("maskable"):
            alone = bool(window["masked"] == window["maskable"])
            self._alone_steps = self._alone_steps + 1 if alone else 0
            if self._alone_steps >= patience:
                raise NoNegativesError(
                    f"for {self._alone_steps} optimizer steps every query's candidates were all masked as the same "
                    "passage as its positive (equal texts, or equal positive_id): the loss is 0 and nothing is "
                    "learned. This is the data, not a collapse: most positives are one text. Fix the data (dedupe "
                    "positives, check positive_id), or set mask_false_negatives=False if equal texts are distinct "
                    "passages")
        if not window.get("micro_batches"):
            return
        spread, ratio = (float(window[key]) / window["micro_batches"] for key in ("spread", "loss_ratio"))
        at_uniform = ratio > UNIFORM_LOSS
        uniform = at_uniform and self._lowest_loss_ratio < LEARNED_LOSS
        self._lowest_loss_ratio = min(self._lowest_loss_ratio, ratio)
        self._collapsed_steps = self._collapsed_steps + 1 if spread < threshold or uniform else 0
        stuck = at_uniform and window["bank_read"] == window["micro_batches"]
        self._stuck_steps = self._stuck_steps + 1 if stuck else 0
        rise = self._track_rise(ratio)
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
                    "from separating")
        elif rise is not None and self._rise_steps >= RISE_PATIENCE_FACTOR * patience:
            steps = self._rise_steps
            what = (f"the loss climbed from {rise[1]:.3f} to {rise[0]:.3f} x its value when every candidate scores "
                    "the same (smoothed over 10 steps) and stayed there: training is undoing what it learned")
        else:
            return
        raise EmbeddingCollapseError(f"the embeddings have collapsed: for {steps} optimizer steps {what}, so nothing "
                                     f"is learned. Stopped before saving a collapsed checkpoint. {_collapse_fixes()}")

    def _track_rise(self, ratio: float):
        """(smoothed ratio, its lowest) while it is RISE_STOP above that lowest value, else None; warns once at
        RISE_WARN."""
        alpha = 2 / (SMOOTHING + 1)
        self._smoothed = ratio if self._smoothed is None else (1 - alpha) * self._smoothed + alpha * ratio
        self._lowest_smoothed = min(self._lowest_smoothed, self._smoothed)
        rise = self._smoothed - self._lowest_smoothed
        if rise > RISE_WARN and not self._warned_rise and math.isfinite(rise):
            self._warned_rise = True
            logger.warning("the contrastive loss has climbed from %.3f to %.3f x log(candidates) (smoothed): the "
                           "embeddings may be degenerating. %s", self._lowest_smoothed, self._smoothed,
                           _collapse_fixes())
        self._rise_steps = self._rise_steps + 1 if rise > RISE_STOP else 0
        return (self._smoothed, self._lowest_smoothed) if rise > RISE_STOP else None

    def pop(self, bank_fill: int) -> dict:
        """Means since the last call, for a log line: negatives per query, the GradNormRatios; the bank fill."""
        for key in list(self._pending):
            self._sum_pending(key)
        sums, self._sums = self._sums, {}
        if not sums.get("micro_batches"):
            return {}
        logs = {"bank_fill": bank_fill, "negatives_per_query": sums["negatives"] / sums["micro_batches"]}
        for key, name in (("ratio", "grad_norm_ratio"), ("raw_ratio", "grad_norm_ratio_raw"),
                          ("towers", "grad_norm_ratio_towers")):
            count = float(sums.get(key + "_count", 0))
            if count:
                logs[name] = float(sums[key]) / count
        return logs

"""Staleness controls: the banked vectors brought up to date with the encoder, at the start of a step.

bank_refresh_steps encodes every banked pair again (ANCE's refresh; the bank keeps each slot's token
ids for it); bank_drift_probe moves every banked vector by the encoder's common drift, measured on a
fixed probe of training pairs. Why and when: docs/staleness.md.

The trainers' lifecycle calls begin_step at each optimizer step's start; the step's first micro-batch
then runs the update (before_micro_batch), inside the forward, where the encoder and the tokens are.
"""
from __future__ import annotations

import torch
from torch import nn

from .bank import MemoryBank
from .features import used_width
from .gather import gather_padded, gather_without_grad, world

SIDES = ("query", "passage")


class Staleness:
    """The refresh or the drift probe of one bank (at most one of them is on; settings.check refuses both)."""

    def __init__(self, refresh_steps: int = 0, drift_probe: int = 0, global_bank: bool = False):
        self.refresh_steps, self.drift_probe_size, self.global_bank = refresh_steps, drift_probe, global_bank
        self.tokens = {}  # side -> (token ids, attention mask) per bank slot (refresh only)
        self.probe = None  # {side: token features} of the probe pairs (drift probe only)
        self.means = None  # the probe's mean (query, passage) vectors at the last correction
        self.due = False

    @property
    def active(self) -> bool:
        return bool(self.refresh_steps or self.drift_probe_size)

    def begin_step(self, step: int) -> None:
        """A new optimizer step; step = steps done so far. Its first micro-batch will update the bank if due."""
        self.due = bool(self.refresh_steps and step % self.refresh_steps == 0) or bool(self.drift_probe_size)

    def _processes(self) -> tuple[int, int]:
        return world() if self.global_bank else (0, 1)

    @torch.no_grad()
    def before_micro_batch(self, bank: MemoryBank, tokens: dict, encode, model: nn.Module, prepare) -> bool:
        """Update the bank if this is a due step's first micro-batch; keep what later updates need. tokens:
        {"query" | "passage": {"input_ids", "attention_mask"}} of this process's pairs, on the device; encode:
        {"query": features, "passage": features} -> (query vectors, passage vectors); prepare: the similarity's
        vector normalisation. Returns True when the banked vectors changed (the loss's cache is then stale)."""
        if self.drift_probe_size and self.probe is None:
            self.probe = {side: {key: t[:self.drift_probe_size].clone() for key, t in f.items()}
                          for side, f in tokens.items()}
        moved = False
        if self.due:
            self.due = False
            moved = self.refresh(bank, encode, prepare) if self.refresh_steps else \
                self.correct_drift(bank, encode, model, prepare)
        if self.refresh_steps:
            self.keep_tokens(bank, tokens)
        return moved

    # -- the refresh ---------------------------------------------------------------------
    def keep_tokens(self, bank: MemoryBank, features: dict) -> None:
        """The token ids of the pairs about to be enqueued, at the bank's slots from its pointer on (a global bank:
        every process's pairs, in rank order, padded to the widest). Whole rows: no old tokens stay."""
        if self._processes()[1] > 1:
            features = {side: dict(zip(f, gather_padded(*f.values()))) for side, f in features.items()}
        for side, f in features.items():
            ids, mask = f["input_ids"], f["attention_mask"].bool()
            kept_ids, kept_mask = self.tokens.get(side, (ids.new_zeros(bank.size, 0, dtype=torch.int32),
                                                         mask.new_zeros(bank.size, 0)))
            if ids.shape[1] > kept_ids.shape[1]:  # a longer batch than any before: widen, padding at the end
                grow = ids.shape[1] - kept_ids.shape[1]
                kept_ids, kept_mask = (nn.functional.pad(t, (0, grow)) for t in (kept_ids, kept_mask))
            slots, grow = bank.slots(bank.ptr, ids.shape[0], ids.device), kept_ids.shape[1] - ids.shape[1]
            kept_ids[slots] = nn.functional.pad(ids.to(torch.int32), (0, grow))
            kept_mask[slots] = nn.functional.pad(mask, (0, grow))
            self.tokens[side] = (kept_ids, kept_mask)

    def token_features(self, rows, side: str) -> dict:
        """The kept tokens of slots `rows` (a slice or an index) as model inputs, cut to their longest text."""
        ids, mask = (t[rows] for t in self.tokens[side])
        width = used_width(mask) or 1
        return {"input_ids": ids[:, :width].long(), "attention_mask": mask[:, :width].long()}

    def refresh(self, bank: MemoryBank, encode, prepare, block: int = 256) -> bool:
        """Encode every banked pair again and replace its vectors. A global bank shared by P processes (each holds
        every pair's tokens) is split in P shares, each process encodes its own, and the vectors are gathered.
        Every process calls the model equally often with equally many rows (a sharded engine gathers parameters
        in every call), so a share that would run past the bank's end encodes the last `count` rows instead and
        keeps only its own. Texts go shortest first (a stable sort, the same on every process), so a block pads
        to about its own texts' length."""
        if not self.tokens or bank.fill == 0:
            return False
        rank, processes = self._processes()
        slots = {side: torch.sort(self.tokens[side][1][:bank.fill].sum(1), stable=True).indices for side in SIDES}
        share = -(-bank.fill // processes)  # texts per process and side, the last share possibly shorter
        for offset in range(0, share, block):
            count = min(block, share - offset)
            firsts = [r * share + offset for r in range(processes)]  # each process's first text of this block
            encoded = [min(first, bank.fill - count) for first in firsts]  # the texts it encodes: [e, e + count)
            mine = slice(encoded[rank], encoded[rank] + count)
            queries, passages = encode({side: self.token_features(slots[side][mine], side) for side in SIDES})
            if processes > 1:
                queries, passages = gather_without_grad(queries), gather_without_grad(passages)
            for r, (first, start) in enumerate(zip(firsts, encoded)):
                own = max(0, min(count, bank.fill - first))  # texts of process r's share in this block
                part = slice(r * count + first - start, r * count + first - start + own)
                if own:
                    bank.queries[slots["query"][first:first + own]] = prepare(queries[part]).to(bank.queries.dtype)
                    bank.passages[slots["passage"][first:first + own]] = prepare(passages[part]).to(bank.passages.dtype)
        return True

    # -- the drift probe -----------------------------------------------------------------
    def correct_drift(self, bank: MemoryBank, encode, model: nn.Module, prepare) -> bool:
        """Move every banked vector by the change of the probe's mean vector since the last call. The probe is
        encoded in eval mode (no dropout: its change is then the encoder's alone). A global bank: every process
        encodes its own probe and the means are averaged, one shift for the one bank."""
        if self.probe is None:
            return False
        was_training = model.training
        model.eval()
        try:
            queries, passages = encode(self.probe)
        finally:
            model.train(was_training)
        means = torch.stack([prepare(queries).mean(0), prepare(passages).mean(0)])
        if self._processes()[1] > 1:
            means = gather_without_grad(means[None]).mean(0)
        moved = False
        if self.means is not None and bank.fill:
            shift = (means - self.means).to(bank.queries.dtype)
            vectors = [(bank.queries[:bank.fill], shift[0]), (bank.passages[:bank.fill], shift[1])]
            if bank.num_hard_negatives:
                vectors.append((bank.hard_negatives[:bank.fill], shift[1]))
            for v, step in vectors:
                v.copy_(prepare(v + step).to(v.dtype))  # back onto the sphere for cosine
            moved = True
        self.means = means
        return moved

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        self.tokens = {}

    def to(self, device) -> None:
        self.tokens = {side: tuple(t.to(device) for t in kept) for side, kept in self.tokens.items()}
        if self.means is not None:
            self.means = self.means.to(device)
            self.probe = {side: {k: t.to(device) for k, t in f.items()} for side, f in self.probe.items()}

    def state_dict(self) -> dict:
        return {"tokens": {side: tuple(t.cpu().clone() for t in kept) for side, kept in self.tokens.items()},
                "probe": self.probe, "means": self.means}

    def load_state_dict(self, state: dict) -> None:
        self.tokens = {side: tuple(kept) for side, kept in state["tokens"].items()}
        self.probe, self.means = state["probe"], state["means"]

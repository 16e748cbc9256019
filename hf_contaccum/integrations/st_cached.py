"""The GradCache pass of the sentence-transformers losses: sentence-transformers' own CachedLossMixin."""
from __future__ import annotations

import weakref

import torch
from sentence_transformers.base.losses.gradcache import CachedLossMixin

from ..data.keys import token_keys


class CachedPass(CachedLossMixin):
    """sentence-transformers' own GradCache (CachedLossMixin), with calculate_loss on the bank: what
    CachedMultipleNegativesRankingLoss runs, so MatryoshkaLoss's cached path wraps it as it wraps CachedMNRL."""

    def __init__(self, owner):
        self._owner = weakref.ref(owner)

    model = property(lambda self: self._owner().model)
    mini_batch_size = property(lambda self: self._owner().mini_batch_size)
    mini_batch_num_tokens = property(lambda self: self._owner().mini_batch_num_tokens)
    show_progress_bar = property(lambda self: self._owner().show_progress_bar)

    def forward_cached(self, features, labels=None):
        self.keys = [token_keys(f) for f in features]
        return CachedLossMixin.forward_cached(self, features, labels)

    def calculate_loss(self, reps, labels=None, *, with_backward: bool = False) -> torch.Tensor:
        # the owner's: a wrapper may have decorated it there (MatryoshkaLoss's CachedLossDecorator)
        return self._owner().calculate_loss(reps, labels, with_backward=with_backward)

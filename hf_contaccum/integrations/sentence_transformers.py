"""hf_contaccum's sentence-transformers losses, and the 0.1 names kept for one release (CHANGELOG.md)."""
from __future__ import annotations

import warnings

from sentence_transformers.util import cos_sim

from .lifecycle import ContAccumCallback
from .st_loss import (
    CachedContAccumMultipleNegativesRankingLoss,
    ContAccumMultipleNegativesRankingLoss,
)

__all__ = ["CachedContAccumMultipleNegativesRankingLoss", "ContAccumBankCallback", "ContAccumLoss",
           "ContAccumMultipleNegativesRankingLoss"]


class ContAccumBankCallback(ContAccumCallback):
    """Deprecated: the loss adds its lifecycle to the Trainer itself. Passing this callback is still accepted."""

    def __init__(self, loss):
        if not isinstance(loss, ContAccumMultipleNegativesRankingLoss):
            raise TypeError("ContAccumBankCallback takes the hf_contaccum.sentence_transformers loss whose bank it saves")
        warnings.warn("ContAccumBankCallback is no longer needed: the loss registers its lifecycle with the trainer",
                      FutureWarning, stacklevel=2)
        super().__init__(loss.contaccum_cores)


class ContAccumLoss(ContAccumMultipleNegativesRankingLoss):
    """Deprecated name of ContAccumMultipleNegativesRankingLoss (0.1's defaults: memory_bank_size=0,
    gather_across_devices=False)."""

    def __init__(self, model, memory_bank_size=0, scale=20.0, similarity_fct=cos_sim, mini_batch_size=None,
                 gather_across_devices=False, **kwargs):
        warnings.warn("hf_contaccum.sentence_transformers.ContAccumLoss is now ContAccumMultipleNegativesRankingLoss "
                      "(default memory_bank_size='auto')", FutureWarning, stacklevel=2)
        super().__init__(model, scale, similarity_fct, gather_across_devices=gather_across_devices,
                         mini_batch_size=mini_batch_size, memory_bank_size=memory_bank_size, **kwargs)

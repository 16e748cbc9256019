"""ContAccum in sentence-transformers: swap the loss, keep everything else (docs/sentence-transformers.md).

    from hf_contaccum.sentence_transformers import ContAccumMultipleNegativesRankingLoss
"""
from .integrations.sentence_transformers import (
    CachedContAccumMultipleNegativesRankingLoss,
    ContAccumBankCallback,
    ContAccumLoss,
    ContAccumMultipleNegativesRankingLoss,
)

__all__ = ["CachedContAccumMultipleNegativesRankingLoss", "ContAccumBankCallback", "ContAccumLoss",
           "ContAccumMultipleNegativesRankingLoss"]

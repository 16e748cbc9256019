"""The ContAccum engine: the bank, its log-sum-exp cache, the loss, the gather, GradCache.

Nothing here imports a trainer or sentence-transformers: hf_contaccum.integrations builds on it.
"""
from .bank import MemoryBank
from .diagnostics import EmbeddingCollapseError, NoNegativesError
from .gradcache import GradCache
from .loss import ContAccumLoss

__all__ = ["ContAccumLoss", "EmbeddingCollapseError", "GradCache", "MemoryBank", "NoNegativesError"]

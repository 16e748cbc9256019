"""hf_contaccum: Contrastive Accumulation (ContAccum) for dense retrievers.

ContAccumTrainer trains a BiEncoder in the Hugging Face Trainer; hf_contaccum.sentence_transformers has the
loss for SentenceTransformerTrainer; ContAccumLoss is the loss on embeddings for any training loop.
Documentation: docs/index.md.
"""
from .core.bank import MemoryBank
from .core.diagnostics import EmbeddingCollapseError, NoNegativesError
from .core.loss import ContAccumLoss
from .data.collator import ContrastiveCollator
from .data.columns import ColumnMap
from .evaluation.evaluator import RetrievalEvaluator
from .integrations.lifecycle import ContAccumCallback
from .integrations.trainer import ContAccumTrainer
from .integrations.training_args import ContAccumTrainingArguments
from .model.biencoder import BiEncoder
from .model.config import BiEncoderConfig
from .settings import ContAccumSettings
from .version import __version__

__all__ = [
    "BiEncoder",
    "BiEncoderConfig",
    "ColumnMap",
    "ContAccumCallback",
    "ContAccumLoss",
    "ContAccumSettings",
    "ContAccumTrainer",
    "ContAccumTrainingArguments",
    "ContrastiveCollator",
    "EmbeddingCollapseError",
    "MemoryBank",
    "NoNegativesError",
    "RetrievalEvaluator",
    "__version__",
]

"""hf_contaccum: Contrastive Accumulation (ContAccum) for dense retrievers.

ContAccumLoss owns the micro-step (any training loop); ContAccumTrainer runs it in the
Hugging Face Trainer; hf_contaccum.sentence_transformers.ContAccumLoss in sentence-transformers."""
from .bank import MemoryBank
from .data import ColumnMap, ContrastiveCollator
from .diagnostics import EmbeddingCollapseError
from .evaluation import RetrievalEvaluator
from .loss import ContAccumLoss
from .model import BiEncoder, BiEncoderConfig
from .trainer import ContAccumTrainer
from .training_args import ContAccumTrainingArguments

__all__ = [
           "BiEncoder",
           "BiEncoderConfig",
           "ColumnMap",
           "ContAccumLoss",
           "ContAccumTrainer",
           "ContAccumTrainingArguments",
           "ContrastiveCollator",
           "EmbeddingCollapseError",
           "MemoryBank",
           "RetrievalEvaluator",
]
__version__ = "0.1.0"

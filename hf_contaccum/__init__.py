"""hf_contaccum: Contrastive Accumulation (ContAccum) for dense retrievers on transformers.Trainer."""
from .bank import MemoryBank
from .data import ColumnMap, ContrastiveCollator
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
           "MemoryBank",
]
__version__ = "0.1.0"

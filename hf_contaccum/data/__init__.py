"""Training data: which column is which, passage identity, batches, checks before training, files, the sample."""
from .collator import ContrastiveCollator
from .columns import ColumnMap

__all__ = ["ColumnMap", "ContrastiveCollator"]

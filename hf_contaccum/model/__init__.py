"""The dual encoder (BiEncoder), its config, its folders on disk and the hub, and its model card."""
from .biencoder import BiEncoder, BiEncoderOutput
from .config import BiEncoderConfig

__all__ = ["BiEncoder", "BiEncoderConfig", "BiEncoderOutput"]

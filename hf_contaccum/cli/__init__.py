"""The command-line programs: contaccum-train (cli/train.py) and python -m hf_contaccum.quickstart."""
from .train import DataArguments, ModelArguments, main

__all__ = ["DataArguments", "ModelArguments", "main"]

"""accelerate launch -m hf_contaccum.cli ...: contaccum-train under several processes."""
import sys

from .train import run

sys.exit(run())

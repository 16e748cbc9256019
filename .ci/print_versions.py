"""One line of the versions the suite runs at, for the logs of .ci/lowest_versions and .ci/newest_versions."""
import platform

import accelerate
import datasets
import evaluate
import faiss
import numpy
import peft
import sentence_transformers
import torch
import transformers

print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "datasets", datasets.__version__, "evaluate", evaluate.__version__,
      "faiss", faiss.__version__, "sentence-transformers", sentence_transformers.__version__, "peft", peft.__version__,
      "numpy", numpy.__version__)

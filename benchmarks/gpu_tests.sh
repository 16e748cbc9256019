#!/bin/bash
# The test suite on a GPU: the trainer tests run on CUDA (tests/conftest.py picks the GPU when there is one and
# builds every reference on it, fp32 without TF32, deterministic kernels); the multi-process, compile and
# sentence-transformers comparisons stay on the CPU as in CI. ~3-5 minutes. Here, first:
#   python benchmarks/gpu_carry.py
# then run(command="bash benchmarks/gpu_tests.sh", carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"]).
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_env.sh
python3 -c "import sys; sys.path.insert(0, 'tests'); import conftest; print('trainer tests run on', conftest.DEVICE)"
set -o pipefail
timeout "${LIMIT:-420}" python3 -m pytest -q -p no:cacheprovider -x --durations 10 ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log"

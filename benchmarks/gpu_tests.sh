#!/bin/bash
# The test suite on a GPU: the trainer tests run on CUDA (tests/conftest.py picks the GPU when there is one and
# builds every reference on it, fp32 without TF32, deterministic kernels); the multi-process, compile and
# sentence-transformers comparisons stay on the CPU, as in CI. First the files whose trainers run on the GPU
# (~1-2 minutes), then the rest; every failure is listed (no -x), and the log comes back as $OUT/tests.log.
# Here, first: python -m benchmarks.gpu_carry; then
#   run(command="bash benchmarks/gpu_tests.sh", carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"])
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_env.sh
python3 -c "import sys; sys.path.insert(0, 'tests'); from helpers.trainers import DEVICE; print('trainer tests run on', DEVICE)"
ON_DEVICE="tests/test_trainer.py tests/test_gradcache.py tests/test_adapters_decoders_prompts.py
    tests/test_hub_and_loading.py tests/test_validation.py tests/test_examples.py"
PYTEST="python3 -m pytest -q -p no:cacheprovider -rf --durations 5"
timeout "${LIMIT:-240}" $PYTEST $ON_DEVICE 2>&1 | tee "$OUT/tests.log"
timeout "${LIMIT_REST:-300}" $PYTEST tests $(for f in $ON_DEVICE; do echo --ignore "$f"; done) 2>&1 | tee -a "$OUT/tests.log"

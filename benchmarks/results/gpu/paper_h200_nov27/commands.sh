#!/bin/bash
# The throughput issue's open GPU checks in one call (~7 minutes on one H100/H200; a session has 15 minutes of
# device time, machine start included). Writes JSON, a profile and the test log under $OUT (default ./gpu_out).
# Here, first: python benchmarks/gpu_carry.py; then
#   run(command="bash benchmarks/gpu_next.sh", carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"], timeout_s=480)
#   1. memory and speed of the current bank code (cache ~5 % of the vectors, no N_mem x d temporary, enqueue after
#      the backward, finiteness read once per step, no host-made indices): target ContAccum - GradAccum <= vectors
#      + 10 % at N_mem 65,536; ContAccum <= 1.05x GradAccum; <= 3.3 s/step at N_total 512
#   2. one_tower_call (queries and passages in one forward of the shared tower: half the launches, ~1.4x the tokens
#      here): does it pay where a micro-step is launch-bound but passages are 8x longer than queries?
#   3. one profiled optimizer step (8 micro-steps): GPU busy %, kernel launches, the host ops that take the time
#   4. the trainer tests on CUDA (device-aware references; the CPU-only comparisons are left to CI)
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_env.sh  # the device image has no datasets, evaluate or faiss: carry .gpu_carry/wheels, test_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', st.__version__)"
B=benchmarks/gpu_paper.py
date; timeout 180 python3 $B --n_total 512 --steps 3 --warmup 1 --methods gradaccum,contaccum-8192,contaccum-65536 \
    --method_timeout 80 --out "$OUT/n512.json"
date; timeout 60 python3 $B --n_total 512 --steps 3 --warmup 1 --methods contaccum-8192 --method_timeout 55 \
    --trainer_args '{"one_tower_call": true}' --out "$OUT/n512_one_tower_call.json"
date; timeout 50 python3 $B --n_total 64 --steps 1 --warmup 1 --methods contaccum-8192 --profile "$OUT" \
    --method_timeout 45 --out "$OUT/n64_profile.json"
date; python3 $B --report "$OUT" 2>&1 | grep -v Warning
date; timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_trainer.py \
    tests/test_gradcache.py tests/test_validation.py 2>&1 | tee "$OUT/tests.log" | tail -25
date

#!/bin/bash
# The throughput issue's open GPU checks in two calls on one warm machine (a session has 15 minutes of device time,
# machine start included): part 1 (~9 minutes) first, part 2 (~4 minutes) if the time is left. Writes JSON, a
# profile and the test log under $OUT (default ./gpu_out).
# Here, first: python -m benchmarks.gpu_carry; then
#   run(command="bash benchmarks/gpu_next.sh 1", carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"], timeout_s=570)
#   run(command="bash benchmarks/gpu_next.sh 2", carry=[".gpu_carry/wheels", ".gpu_carry/test_wheels"], timeout_s=280)
# What the run of 2026-11-27 (benchmarks/results/gpu/paper_h200_nov27/commands.sh) left open:
#   1. memory after the loss stopped running under autocast (it had kept two bf16 copies of the bank for the
#      backward): target ContAccum - GradAccum <= vectors + 10 % at N_mem 8,192 and 65,536; and 5 timed steps,
#      since 3 could not resolve 1.05x GradAccum (steps of one method spread by +-10 %)
#   2. attention without cuDNN's kernels (the profile: cuDNN's attention took ~0.7 ms of host time per call,
#      ~28 % of the micro-step's host time), with and without one_tower_call (0.71x the step in that run)
#   3. sentence-transformers' CachedMNRL in the same run (the 2.5x target), and a profile without cuDNN attention
#   4. the trainer tests on CUDA after the four fixes (sync recorder's path filter, pinning, deterministic attention)
#   5. (since 2026-11-27, afternoon) the first GPU timing of the code with ~40 % fewer ops of ours per micro-step
#      (benchmarks/launch_count.py: bert-base, ContAccum - GradAccum 112 -> 70 of ~2,500 ops): item 1's ratios
#   6. (since 2026-11-27, evening) CUDA graphs with gradient accumulation (benchmarks/cuda_graphs.py): are the
#      accumulated gradients right on this torch with the gradients set to None (refused by the library since then)
#      and with gradient buffers kept, and how fast is a bert-base micro-step under them against eager and compile
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
. benchmarks/gpu_env.sh  # the device image has no datasets, evaluate or faiss: carry .gpu_carry/wheels, test_wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', st.__version__)"
B="python -m benchmarks.gpu_paper --n_total 512 --steps 5 --warmup 1"
if [ "${1:-1}" = 1 ]; then
date; timeout 170 $B --methods gradaccum,contaccum-8192,contaccum-65536 --method_timeout 75 --out "$OUT/n512.json"
date; timeout 250 python -m benchmarks.cuda_graphs --speed --out "$OUT/cuda_graphs.json" 2>&1 | grep -v Warning | tail -40
date; python -m benchmarks.gpu_paper --report "$OUT" 2>&1 | grep -v Warning
date; timeout "${TEST_LIMIT:-100}" python3 -m pytest -q -p no:cacheprovider -rf \
    tests/test_compile.py::test_cuda_graphs_with_one_backward_per_step_train_like_eager tests/test_trainer.py \
    tests/test_gradcache.py tests/test_validation.py tests/test_loss.py 2>&1 | tee "$OUT/tests.log" | tail -15
else
date; timeout 75 $B --methods st-cmnrl --method_timeout 70 --out "$OUT/n512_st_cmnrl.json"
date; timeout 110 $B --methods gradaccum,contaccum-8192 --attention no-cudnn --method_timeout 55 \
    --out "$OUT/n512_no_cudnn.json"
date; timeout 60 $B --methods contaccum-8192 --attention no-cudnn --trainer_args '{"one_tower_call": true}' \
    --method_timeout 55 --out "$OUT/n512_no_cudnn_one_tower_call.json"
date; timeout 45 python -m benchmarks.gpu_paper --n_total 64 --steps 1 --warmup 1 --methods contaccum-8192 \
    --attention no-cudnn --profile "$OUT" --method_timeout 40 --out "$OUT/n64_profile_no_cudnn.json"
date; python -m benchmarks.gpu_paper --report "$OUT" 2>&1 | grep -v Warning
fi
date

#!/bin/bash
# The next GPU session's checks for the throughput issue, sized to ~11 minutes on one H100/H200
# (a session has 15 minutes of device time, machine start included). Writes JSON and profiles
# under $OUT (default ./gpu_out). Run python benchmarks/gpu_carry.py here first and carry .gpu_carry/wheels (datasets).
#   1. memory and speed of the current bank code (cache ~5 % of the vectors, no N_mem x d temporary,
#      enqueue after the backward, finiteness once per step): target ContAccum - GradAccum <= vectors + 10 %
#   2. non_blocking host-to-device copies (pinned memory): does the micro-step's host time drop? And
#      one_tower_call (queries and passages in one forward of the shared tower: half the launches)
#   3. one profiled optimizer step (8 micro-steps): GPU busy %, kernel launches, the host ops that take the time
#   4. CUDA graphs (torch_compile_mode "reduce-overhead", fixed shapes): can a launch-bound micro-step of 8
#      pairs get near the full batch's 1 ms per pair? And compiled GradAccum, the compiled baseline
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/prof"
. benchmarks/gpu_env.sh  # the device image has no datasets: carry .gpu_carry/wheels
B=benchmarks/gpu_paper.py
timeout 170 python3 $B --n_total 512 --methods gradaccum,contaccum-8192,contaccum-65536 --method_timeout 80 --out "$OUT/memory.json"
timeout 110 python3 $B --n_total 512 --methods gradaccum,contaccum-8192 --method_timeout 55 \
    --trainer_args '{"accelerator_config": {"non_blocking": true}}' --out "$OUT/non_blocking.json"
timeout 110 python3 $B --n_total 512 --methods gradaccum,contaccum-8192 --method_timeout 55 \
    --trainer_args '{"one_tower_call": true}' --out "$OUT/one_tower_call.json"
timeout 60 python3 $B --n_total 64 --steps 1 --methods contaccum-8192 --profile "$OUT/prof" --method_timeout 55 --out "$OUT/prof/profile.json"
timeout 110 python3 $B --n_total 512 --methods contaccum-8192+compile --method_timeout 105 \
    --trainer_args '{"torch_compile_mode": "reduce-overhead"}' --out "$OUT/cuda_graphs.json"
timeout 110 python3 $B --n_total 512 --methods gradaccum+compile --method_timeout 105 --out "$OUT/compiled_gradaccum.json"
python3 $B --report "$OUT"

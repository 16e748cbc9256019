#!/bin/bash
# Issue 14's evidence at the issue's scale, on one GPU: N_total 128 = 8 x 16, 150 optimizer steps, lr 5e-5 (the
# held-out task's), 3 seeds. One process per (task, method, seed), PARALLEL of them at a time, taken in the order
# of JOBS (most important first); every job must end before LIMIT seconds from the start, so a call cut short
# still returns the jobs that finished, each saved to its own JSON and merged per task at the end.
# Here, first: python -m benchmarks.gpu_carry (builds .gpu_carry/: wheels, MiniLM in fp16, the two built tasks);
# then run(command="bash benchmarks/gpu_staleness.sh", carry=[".gpu_carry/wheels", ".gpu_carry/minilm",
# ".gpu_carry/tasks"], timeout_s=...) (49 MiB: the test wheels would take the call over its 64 MiB).
# JOBS is a list of task:method (each run for seeds 0 .. SEEDS-1) or task:method:seed. Sizing, from the H200 run of
# 2026-11-27 (14 at a time, one CPU core each; the micro-steps are host-bound, so more at once is not faster): a run
# with 8 micro-steps per optimizer step reached 110-125 of its 150 steps in 7 minutes, the full batch finished in
# 3.5-7: one 10-minute call finishes about one wave of 14 such runs; the refresh (2.7x the compute) does not fit one.
# For a CPU smoke run:
#   N_TOTAL=16 STEPS=2 SEEDS=1 JOBS="code:gradaccum debian:contaccum-16" OUT=/tmp/s bash benchmarks/gpu_staleness.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; RUNS=${RUNS:-/tmp/staleness_runs}; mkdir -p "$OUT" "$RUNS"  # (a call returns 8 files: runs go in one archive)
N_TOTAL=${N_TOTAL:-128}; STEPS=${STEPS:-150}; SEEDS=${SEEDS:-3}; LIMIT=${LIMIT:-540}; LR=${LR:-5e-5}
PARALLEL=${PARALLEL:-14}
BIG=$((4 * N_TOTAL))
# Default: what #14 still lacks at N_total 128 (one wave; every baseline has 3 seeds on all three tasks since
# 2026-11-27): the 4x bank moved by the drift probe on code search (Debian's 3 seeds ran on the CPU).
# The refresh (2.7x the compute) needs a call of its own: JOBS="code:contaccum-$BIG-fresh debian:contaccum-$BIG-fresh".
JOBS=${JOBS:-"code:contaccum-$BIG-drift"}
export OMP_NUM_THREADS=1
. benchmarks/gpu_env.sh
if [ -d "$CARRY/minilm" ]; then  # fp16 on the way: widen to fp32 (transformers would keep fp16)
    python3 - "$CARRY/minilm" /tmp/minilm_fp32 <<'PY' || exit 1
import shutil, sys
from safetensors.torch import load_file, save_file
source, target = sys.argv[1:]
shutil.copytree(source, target, dirs_exist_ok=True)
weights = load_file(f"{source}/model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, f"{target}/model.safetensors",
          metadata={"format": "pt"})
PY
    export CONTACCUM_BENCH_ENCODER=/tmp/minilm_fp32
fi
[ -d "$CARRY/tasks" ] && export CONTACCUM_BENCH_TASKS=$CARRY/tasks
export DEADLINE=$(( $(date +%s) + LIMIT )) N_TOTAL STEPS LR RUNS
date
job() {  # task:method:seed, given the seconds left before the deadline
    IFS=: read -r task method seed <<< "$1"
    left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 30 ] || { echo "skipped (no time left): $1"; return 0; }
    name="$RUNS/${task}_${method}_seed$seed"
    timeout "$left" python -m benchmarks.staleness --task "$task" --n_total "$N_TOTAL" --steps "$STEPS" --lr "$LR" \
        --seeds 1 --first_seed "$seed" --methods "$method" --output "$name.json" > "$name.log" 2>&1
    rc=$?; echo "$(date +%T) rc $rc $1"
}
export -f job
for entry in $JOBS; do
    if [[ $entry == *:*:* ]]; then echo "$entry"; else for seed in $(seq 0 $((SEEDS - 1))); do echo "$entry:$seed"; done; fi
done |
    xargs -P "$PARALLEL" -I{} bash -c 'job {}'
date
for task in $(for entry in $JOBS; do echo "${entry%%:*}"; done | sort -u); do
    ls "$RUNS/${task}"_*.json >/dev/null 2>&1 || continue
    echo "== $task"
    python -m benchmarks.staleness --merge "$OUT/staleness_${task}_n${N_TOTAL}.json" "$RUNS/${task}"_*.json
done
tar czf "$OUT/staleness_runs.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"  # every run's JSON and log

#!/bin/bash
# Issue 14's evidence at the issue's scale, on one GPU (~7-10 minutes): N_total 128 = 8 x 16, 150 optimizer
# steps, lr 5e-5 (the held-out task's), 3 seeds, on WordNet, Debian package search and code search: GradAccum,
# GradCache, full batch, N_mem = N_total, N_mem = 4 x N_total plain / refreshed every step / moved by the drift
# probe (the settings that mattered at N_total 32 and on the CPU at N_total 128; METHODS= (empty) runs every
# method of benchmarks/staleness.py, which may not fit one 10-minute call). One process per (task, seed), all at
# once; each saves after every run, so a cut-off call still returns what finished. Here, first: python benchmarks/gpu_carry.py (builds .gpu_carry/:
# wheels, MiniLM in fp16, the two built tasks); then run(command="bash benchmarks/gpu_staleness.sh",
# carry=[".gpu_carry/wheels", ".gpu_carry/minilm", ".gpu_carry/tasks"], timeout_s=600) (49 MiB: the test wheels
# would take the call over its 64 MiB). Settings can be overridden for a CPU smoke run:
#   N_TOTAL=16 STEPS=2 SEEDS=2 TASKS=code METHODS=gradaccum,contaccum-16 OUT=/tmp/s bash benchmarks/gpu_staleness.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
N_TOTAL=${N_TOTAL:-128}; STEPS=${STEPS:-150}; SEEDS=${SEEDS:-3}; TASKS=${TASKS:-"wordnet debian code"}
LIMIT=${LIMIT:-540}; LR=${LR:-5e-5}
BIG=$((4 * N_TOTAL))
METHODS=${METHODS-"gradaccum,gradcache,full,contaccum-$N_TOTAL,contaccum-$BIG,contaccum-$BIG-fresh,contaccum-$BIG-drift"}
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
date
for task in $TASKS; do
    for seed in $(seq 0 $((SEEDS - 1))); do
        timeout "$LIMIT" python3 benchmarks/staleness.py --task "$task" --n_total "$N_TOTAL" --steps "$STEPS" \
            --lr "$LR" --seeds 1 --first_seed "$seed" ${METHODS:+--methods "$METHODS"} --output "$OUT/staleness_${task}_seed$seed.json" \
            > "$OUT/staleness_${task}_seed$seed.log" 2>&1 &
    done
done
wait
date
for task in $TASKS; do
    ls "$OUT"/staleness_"${task}"_seed*.json >/dev/null 2>&1 || continue
    echo "== $task"
    python3 benchmarks/staleness.py --merge "$OUT/staleness_${task}_n${N_TOTAL}.json" "$OUT"/staleness_"${task}"_seed*.json
done

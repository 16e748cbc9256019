#!/bin/bash
# one GPU session: the issue-13 benchmark at N_total 512, compiled variants, a profile, full batch at 128
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl || exit 1
python3 -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pyarrow-*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch,transformers,datasets,sentence_transformers,accelerate,pyarrow,pynvml;print('torch',torch.__version__,'transformers',transformers.__version__,'datasets',datasets.__version__,'st',sentence_transformers.__version__,'accelerate',accelerate.__version__,'pyarrow',pyarrow.__version__,torch.cuda.get_device_name(), torch.cuda.utilization())"
B=benchmarks/gpu_paper.py
date; timeout 320 python3 $B --n_total 512 --steps 3 --warmup 1 --method_timeout 90 --out $OUT/gpu_paper_512.json
date; timeout 140 python3 $B --n_total 512 --steps 3 --warmup 1 --methods contaccum-8192+compile,gradaccum+compile --method_timeout 100 --out $OUT/gpu_paper_512_compile.json
date; mkdir -p $OUT/prof; timeout 55 python3 $B --n_total 512 --steps 1 --warmup 1 --methods contaccum-8192 --profile $OUT/prof --method_timeout 50 --out $OUT/prof/gpu_paper_profile.json
date; timeout 45 python3 $B --n_total 128 --steps 3 --warmup 1 --methods full,gradaccum --method_timeout 40 --out $OUT/gpu_paper_128.json
date

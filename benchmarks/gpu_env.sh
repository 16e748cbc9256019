# Sourced by the benchmarks/gpu_*.sh scripts, on the device machine: what its image lacks comes as wheels
# in .gpu_carry (built here by python -m benchmarks.gpu_carry; carry the folders the script names), the
# repository goes on PYTHONPATH, and nothing reaches for the hub.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
CARRY=$PWD/.gpu_carry
WHEELS=$(ls "$CARRY"/wheels/*.whl "$CARRY"/test_wheels/*.whl 2>/dev/null)
if [ -n "$WHEELS" ] && ! python3 -c "import datasets, evaluate, faiss" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $WHEELS || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

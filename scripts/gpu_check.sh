#!/usr/bin/env bash
# On a lent GPU machine: install the agent runtime from the carried wheels, run the CUDA
# artifacts of the test models on the GPU, compare with the reference outputs computed by
# scripts/gpu_check_prepare.sh, time them against PyTorch CUDA eager, write results to $OUT.
# Usage (device tool, carry [".gpu-check"]): bash scripts/gpu_check.sh [DATA_DIR]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$(cd "${1:-$REPO/.gpu-check}" && pwd)"
OUT="${OUT:-$REPO/gpu-check-out}"
SITE="${SITE:-/tmp/edgeloop-site}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi (no GPU driver?)" >"$OUT/nvidia-smi.txt"
cat "$OUT/nvidia-smi.txt"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is false); nothing to check" \
        | tee "$OUT/gpu_check.log" >&2
    exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$DATA"/wheels/*.whl
# TVM's CUDA plugin needs libcudart.so.13: the toolkit's, else the one pip installed for torch.
PIP_CUDA="$(python3 -c "import glob, site; print(':'.join(sorted(glob.glob(site.getsitepackages()[0] + '/nvidia/*/lib'))))" 2>/dev/null || true)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${PIP_CUDA:+:$PIP_CUDA}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# CUDA tuning (unverified on hardware until this runs on a GPU): dlight vs MetaSchedule-tuned
# build of the small model, through the compiler in this checkout. It needs TVM's compiler,
# xgboost and cryptography: those installed here, or a site carried in $DATA/compiler-site
# (TUNE_SITE). Without them it records why in gpu_tune.json and skips. GPU_CHECK_TUNE=0 skips
# it; TUNE_TIMEOUT_S bounds it so the whole check stays under 10 minutes.
if [ "${GPU_CHECK_TUNE:-1}" != 0 ]; then
    TUNE_SITE="${TUNE_SITE:-$DATA/compiler-site}"
    (cd "$REPO" && PYTHONPATH="$REPO${TUNE_SITE:+:$TUNE_SITE}" PYTHONUNBUFFERED=1 \
        timeout "${TUNE_TIMEOUT_S:-420}" python3 scripts/gpu_check.py tune \
            --data "$DATA" --out "$OUT" --trials "${TUNE_TRIALS:-16}") 2>&1 | tee "$OUT/gpu_tune.log" \
        || echo "gpu_check: the tuning step failed or timed out (see gpu_tune.json)" >&2
fi
# Runtime-only TVM, as on a device; run outside the checkout so `agent` comes from the wheel.
export PYTHONPATH="$SITE" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
cd /tmp
python3 "$REPO/scripts/gpu_check.py" check --data "$DATA" --out "$OUT" --repo "$REPO" "${@:2}" \
    2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Prepare everything scripts/gpu_check.sh needs on a lent GPU machine (run here, no GPU):
#   .gpu-check/            (git-ignored; pass it as `carry` to the device tool, < 64 MiB)
#     artifacts/...        CUDA artifacts of the test models (nvcc fatbins inside)
#     *_reference.npz      seeded inputs and ONNX Runtime reference outputs
#     *.pt                 PyTorch weights of the same models (for the eager baseline)
#     wheels/              the agent runtime for CPython 3.12 x86_64: edgeloop, a runtime-only
#                          apache-tvm (the 259 MB compiler library removed), apache-tvm-ffi,
#                          pydantic and its dependencies
# Usage: bash scripts/gpu_check_prepare.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-.gpu-check}"
PY="${PYTHON:-python}"
mkdir -p "$DATA/wheels" "$DATA/download"
rm -f "$DATA"/wheels/*.whl

"$PY" scripts/gpu_check.py prepare --data "$DATA"

# Wheels for the GPU machine's Python (3.12, manylinux x86_64), same versions as here.
ver() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DATA/download" \
    "apache-tvm==$(ver apache-tvm)" "apache-tvm-ffi==$(ver apache-tvm-ffi)" \
    "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
"$PY" - "$DATA" <<'PYEOF'
"""Copy the wheels, slimming apache-tvm to its runtime (what a device installs)."""
import shutil, sys, zipfile
from pathlib import Path

data = Path(sys.argv[1])
# Serving needs libtvm_runtime(+_cuda).so and the Python package, not the compiler
# library, its third-party headers or C++ sources (docs/toolchain.md, runtime-only TVM).
DROP = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/src/", "tvm/include/")
for wheel in sorted((data / "download").glob("*.whl")):
    target = data / "wheels" / wheel.name
    if not wheel.name.startswith("apache_tvm-"):
        shutil.copyfile(wheel, target)
        continue
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROP):
                continue
            body = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                body = b"\n".join(
                    line for line in body.splitlines() if not line.decode().startswith(DROP)
                ) + b"\n"
            dst.writestr(info, body)
    print(f"slimmed {wheel.name}: {wheel.stat().st_size >> 20} MiB -> {target.stat().st_size >> 20} MiB")
PYEOF
# edgeloop itself (pure Python; hatchling from PyPI as the build backend).
"$PY" -m pip wheel -q --no-deps -w "$DATA/wheels" .
rm -rf "$DATA/download" "$DATA/tuning" "$DATA/config"
du -sh "$DATA"; ls -la "$DATA/wheels"

#!/usr/bin/env bash
# Cross-build the armv7 (armhf) TVM runtime and edgeloop's C++ runner (runtime/armv7/).
#
# Output: ${EDGELOOP_CACHE_DIR:-$HOME/.cache/edgeloop}/armv7-runtime/
#   edgeloop-armv7-runner   armhf executable, stripped (TVM runtime + tvm-ffi + libstdc++ linked in;
#                           needs only glibc and libgcc_s on the target)
#   build/                  CMake build tree, kept for incremental rebuilds
#   STAMP                   written last; records the TVM / tvm-ffi versions and a hash of the sources
#
# Idempotent: when STAMP matches the installed packages and the sources, it does nothing.
# The TVM runtime sources come from the installed pip packages (apache-tvm, apache-tvm-ffi), the few
# headers they lack from runtime/armv7/third_party (see runtime/armv7/README.md).
#
# Environment: EDGELOOP_CACHE_DIR, PYTHON (default python3), EDGELOOP_BUILD_JOBS (default nproc).
# Needs: g++-arm-linux-gnueabihf, cmake >= 3.18; ninja is used when present.
set -euo pipefail

log() { printf '[build-armv7-runtime] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src_dir="$repo_root/runtime/armv7"
out_dir="${EDGELOOP_CACHE_DIR:-$HOME/.cache/edgeloop}/armv7-runtime"
build_dir="$out_dir/build"
python="${PYTHON:-python3}"
jobs="${EDGELOOP_BUILD_JOBS:-$(nproc)}"

for tool in arm-linux-gnueabihf-gcc arm-linux-gnueabihf-g++ arm-linux-gnueabihf-strip cmake "$python"; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "'$tool' not found (apt-get install g++-arm-linux-gnueabihf cmake; pip install 'edgeloop[compiler]')"
done

# Locate the packages without importing them (importing tvm loads the 259 MB compiler library).
pkg_info=$("$python" - <<'PY'
import importlib.metadata as md
import importlib.util
import os

for module, dist in (("tvm", "apache-tvm"), ("tvm_ffi", "apache-tvm-ffi")):
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"python package '{module}' ({dist}) is not installed")
    print(os.path.dirname(spec.origin))
    print(md.version(dist))
PY
) || die "cannot locate apache-tvm / apache-tvm-ffi with $python"
{ read -r tvm_dir; read -r tvm_version; read -r ffi_dir; read -r ffi_version; } <<<"$pkg_info"

[[ -f "$tvm_dir/src/runtime/vm/vm.cc" ]] || die "$tvm_dir has no src/runtime (this apache-tvm wheel ships no C++ sources)"
[[ -f "$ffi_dir/src/ffi/object.cc" ]] || die "$ffi_dir has no src/ffi (this apache-tvm-ffi wheel ships no C++ sources)"

sources_hash=$(cd "$repo_root" \
  && find runtime/armv7 scripts/build-armv7-runtime.sh -type f -print0 | LC_ALL=C sort -z \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
expected_stamp=$(printf 'tvm=%s\ntvm_ffi=%s\ntvm_dir=%s\ntvm_ffi_dir=%s\ncompiler=%s\nsources_sha256=%s\n' \
  "$tvm_version" "$ffi_version" "$tvm_dir" "$ffi_dir" \
  "$(arm-linux-gnueabihf-g++ --version | head -n1)" "$sources_hash")

if [[ -f "$out_dir/STAMP" && -x "$out_dir/edgeloop-armv7-runner" ]] \
  && [[ "$(cat "$out_dir/STAMP")" == "$expected_stamp" ]]; then
  log "up to date: $out_dir/edgeloop-armv7-runner (tvm $tvm_version, tvm-ffi $ffi_version)"
  exit 0
fi

log "building for tvm $tvm_version, tvm-ffi $ffi_version into $out_dir ($jobs jobs)"
mkdir -p "$out_dir"
rm -f "$out_dir/STAMP"
start=$SECONDS

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S "$src_dir" -B "$build_dir" "${generator[@]}" \
  -DCMAKE_TOOLCHAIN_FILE="$src_dir/cmake/arm-linux-gnueabihf.cmake" \
  -DCMAKE_BUILD_TYPE=Release \
  -DTVM_SOURCE_DIR="$tvm_dir" \
  -DTVM_FFI_SOURCE_DIR="$ffi_dir" \
  -DEDGELOOP_TVM_VERSION="$tvm_version" >&2
cmake --build "$build_dir" --parallel "$jobs" >&2

# Strip with the cross binutils (the host strip does not know ARM); .dynsym stays, and with it the
# TVM symbols that artifacts resolve against the runner.
arm-linux-gnueabihf-strip -o "$out_dir/edgeloop-armv7-runner.tmp" "$build_dir/edgeloop-armv7-runner"
chmod 0755 "$out_dir/edgeloop-armv7-runner.tmp"
mv -f "$out_dir/edgeloop-armv7-runner.tmp" "$out_dir/edgeloop-armv7-runner"
printf '%s' "$expected_stamp" >"$out_dir/STAMP.tmp"
mv -f "$out_dir/STAMP.tmp" "$out_dir/STAMP"
log "done in $((SECONDS - start)) s: $out_dir/edgeloop-armv7-runner ($(du -h "$out_dir/edgeloop-armv7-runner" | cut -f1))"

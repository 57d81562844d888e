#!/usr/bin/env bash
# Build the aarch64 Python sysroot that runs compiled TVM artifacts and the device agent
# under qemu-user.
#
# Usage: scripts/build-arm-sysroot.sh [DEST]
#
# DEST defaults to ${EDGELOOP_CACHE_DIR:-~/.cache/edgeloop}/sysroots/aarch64. The result is a cache,
# never committed: Debian bookworm arm64 python3.11 and the libraries it needs (unpacked with
# dpkg -x, never configured) plus, in DEST/site, the aarch64 wheels of the TVM runtime and
# numpy and of everything `edgeloop-agent run` imports (the core dependencies and the agent
# extra of pyproject.toml). compiler/emulation.py calls this script and runs Python in DEST with
#   qemu-aarch64-static -L DEST DEST/usr/bin/python3.11   (PYTHONPATH=DEST/site);
# agent/emulation.py runs the agent that way (PYTHONPATH=DEST/site:<the repo>).
#
# Idempotent: exits at once when DEST carries a stamp written by this exact script (the stamp
# records the script's sha256, so editing a pin below forces a rebuild). A build happens in a
# temporary directory next to DEST, is smoke-tested under qemu, gets its stamp last and is then
# renamed into place, so a half-built sysroot is never taken for a ready one. Concurrent runs
# serialize on a lock file. Needs: apt-get, dpkg, debian-archive-keyring, qemu-user-static,
# flock, and a host python3 with pip (for `pip download` of foreign wheels).
# Environment: EDGELOOP_CACHE_DIR, EDGELOOP_DEBIAN_MIRROR, EDGELOOP_DEBIAN_SECURITY_MIRROR, PYTHON.
set -euo pipefail

# ---- the recipe: change a pin here and the next run rebuilds -------------------------------
readonly SUITE=bookworm
readonly DEB_ARCH=arm64
# What we ask apt for; apt resolves the closure (Depends + Pre-Depends, no Recommends).
# install-info satisfies readline-common's "dpkg | install-info": without it apt picks dpkg,
# which drags in dpkg and tar (packaging tools an unpacked, never-configured sysroot does not run).
readonly ROOT_PACKAGES=(python3.11-minimal libpython3.11-stdlib libstdc++6 install-info)
readonly PY_VERSION=3.11
readonly WHEELS=(
  # the TVM runtime (compiler/runner_main.py, the agent's TVM runtime)
  apache-tvm==0.27.0.post1
  apache-tvm-ffi==0.1.14.post0
  numpy==2.4.6
  ml_dtypes==0.6.0
  typing_extensions==4.15.0
  # the device agent: the core dependencies and the agent extra of pyproject.toml. pydantic is
  # pinned to 2.12.5 because its pydantic-core 2.41.5 has aarch64 wheels in every index we use
  # (the host's pydantic-core 2.46.x has none in some); the agent needs nothing newer.
  pydantic==2.12.5
  pydantic-core==2.41.5
  pydantic-settings==2.14.1
  python-dotenv==1.2.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  click==8.4.0
  cryptography==48.0.0
  cffi==2.0.0
  pycparser==3.0
  paho-mqtt==2.2.0
  prometheus-client==0.26.0
  PyYAML==6.0.3
  platformdirs==4.14.8
  packaging==26.2
  rich==15.0.0
  markdown-it-py==4.3.0
  mdurl==0.1.2
  pygments==2.20.0
)
# Byte-compiled ahead of time with the host's python3.11 (bytecode is the same on every arch of
# one CPython minor version), so the emulated agent never compiles them at start-up.
readonly PRECOMPILED=(pydantic pydantic_core pydantic_settings dotenv annotated_types
  typing_inspection click cryptography cffi pycparser paho prometheus_client yaml
  platformdirs packaging)
readonly WHEEL_PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64)
readonly STAMP_NAME=.edgeloop-sysroot-stamp
# 2: the sysroot also carries the agent's dependencies (compiler/emulation.py and
# agent/emulation.py accept only this format, so older caches rebuild).
readonly STAMP_FORMAT=2
# ----------------------------------------------------------------------------------------------

log() { printf '[build-arm-sysroot] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() {  # need COMMAND HINT
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found; $2"
}

if [[ $# -gt 1 || ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  [[ $# -gt 1 ]] && exit 2
  exit 0
fi

readonly CACHE_DIR=${EDGELOOP_CACHE_DIR:-$HOME/.cache/edgeloop}
DEST=${1:-$CACHE_DIR/sysroots/aarch64}
readonly MIRROR=${EDGELOOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
readonly SECURITY_MIRROR=${EDGELOOP_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PYTHON=${PYTHON:-python3}

need apt-get "run on a Debian/Ubuntu host"
need dpkg "run on a Debian/Ubuntu host"
need qemu-aarch64-static "install the Debian package qemu-user-static"
need flock "install the Debian package util-linux"
need sha256sum "install the Debian package coreutils"
need "$PYTHON" "set PYTHON to a host python3 that has pip"
[[ -r $KEYRING ]] || die "$KEYRING not readable; install the Debian package debian-archive-keyring"

mkdir -p "$(dirname "$DEST")"
DEST=$(cd "$(dirname "$DEST")" && pwd)/$(basename "$DEST")
readonly DEST
PARENT=$(dirname "$DEST")
NAME=$(basename "$DEST")
RECIPE=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
readonly PARENT NAME RECIPE

is_ready() {
  local stamp=$DEST/$STAMP_NAME
  [[ -f $stamp ]] \
    && grep -qx "format=$STAMP_FORMAT" "$stamp" \
    && grep -qx "arch=aarch64" "$stamp" \
    && grep -qx "recipe_sha256=$RECIPE" "$stamp"
}

exec 9>"$PARENT/.$NAME.lock"
log "taking lock $PARENT/.$NAME.lock"
flock -w 3600 9 || die "could not lock $PARENT/.$NAME.lock within an hour"

if is_ready; then
  log "sysroot ready at $DEST"
  exit 0
fi

# Only ever replace what this script made (it carries a stamp) or an empty directory.
if [[ -e $DEST && ! -f $DEST/$STAMP_NAME && -n $(ls -A "$DEST" 2>/dev/null) ]]; then
  die "$DEST exists and is not a sysroot built by this script; move it away"
fi

START=$SECONDS
WORK=$(mktemp -d "$PARENT/.$NAME.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/sysroot
mkdir -p "$ROOT" "$WORK/debs" "$WORK/wheels" "$WORK/apt/lists/partial" \
  "$WORK/apt/cache/archives/partial" "$WORK/apt/etc/preferences.d" "$WORK/apt/etc/sources.list.d"
: >"$WORK/apt/status"
cat >"$WORK/apt/etc/sources.list" <<EOF
deb [arch=$DEB_ARCH signed-by=$KEYRING] $MIRROR $SUITE main
deb [arch=$DEB_ARCH signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [arch=$DEB_ARCH signed-by=$KEYRING] $SECURITY_MIRROR $SUITE-security main
EOF

# A private apt: its own sources, lists, cache and an empty dpkg status, so neither the host's
# installed packages nor its sources (or pins) influence what is resolved; run as root without
# the _apt sandbox user, who cannot write into this directory.
APT_OPTS=(
  -q
  -oAPT::Architecture="$DEB_ARCH"
  -oAPT::Architectures="$DEB_ARCH"
  -oDir::State::Lists="$WORK/apt/lists"
  -oDir::Cache="$WORK/apt/cache"
  -oDir::State::status="$WORK/apt/status"
  -oDir::Etc::SourceList="$WORK/apt/etc/sources.list"
  -oDir::Etc::SourceParts="$WORK/apt/etc/sources.list.d"
  -oDir::Etc::Preferences="$WORK/apt/etc/preferences"
  -oDir::Etc::PreferencesParts="$WORK/apt/etc/preferences.d"
  -oAPT::Sandbox::User=root
  -oDebug::NoLocking=1
)

log "apt: updating $SUITE $DEB_ARCH lists into $WORK/apt"
apt-get "${APT_OPTS[@]}" update >&2

log "apt: resolving ${ROOT_PACKAGES[*]}"
mapfile -t PINS < <(
  apt-get "${APT_OPTS[@]}" --simulate --no-install-recommends install "${ROOT_PACKAGES[@]}" \
    | awk '$1 == "Inst" { v = $3; sub(/^\(/, "", v); print $2 "=" v }'
)
[[ ${#PINS[@]} -gt 0 ]] || die "apt resolved no packages for: ${ROOT_PACKAGES[*]}"
log "apt: downloading ${#PINS[@]} packages: ${PINS[*]}"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "${PINS[@]}" >&2)

log "dpkg: unpacking into the sysroot"
for deb in "$WORK"/debs/*.deb; do
  dpkg -x "$deb" "$ROOT"
done
[[ -x $ROOT/usr/bin/python$PY_VERSION ]] || die "no usr/bin/python$PY_VERSION after unpacking"

log "pip: downloading aarch64 wheels: ${WHEELS[*]}"
PLATFORM_ARGS=()
for platform in "${WHEEL_PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$platform"); done
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
  --implementation cp --python-version "$PY_VERSION" "${PLATFORM_ARGS[@]}" \
  --dest "$WORK/wheels" "${WHEELS[@]}" >&2
shopt -s nullglob
WHEEL_FILES=("$WORK"/wheels/*.whl)
shopt -u nullglob
[[ ${#WHEEL_FILES[@]} -eq ${#WHEELS[@]} ]] \
  || die "expected ${#WHEELS[@]} wheels, pip gave ${#WHEEL_FILES[@]}: ${WHEEL_FILES[*]}"
mkdir -p "$ROOT/site"
for wheel in "${WHEEL_FILES[@]}"; do
  "$PYTHON" -m zipfile -e "$wheel" "$ROOT/site"
done

log "pruning docs, tests, headers, sources and the TVM compiler library"
rm -rf "$ROOT"/usr/share/{doc,man,info,lintian,locale,bug,gdb} \
  "$ROOT"/usr/lib/aarch64-linux-gnu/gconv \
  "$ROOT"/site/tvm/lib/libtvm_compiler.so \
  "$ROOT"/site/tvm/lib/libtvm_runtime_cuda.so \
  "$ROOT"/site/tvm/lib/libtvm_runtime_extra.so \
  "$ROOT"/site/tvm/{3rdparty,src,include} \
  "$ROOT"/site/tvm_ffi/{3rdparty,src,include} \
  "$ROOT"/site/numpy/_core/include
find "$ROOT" -depth -type d \( -name __pycache__ -o -name tests \) -exec rm -rf {} +
[[ -f $ROOT/site/tvm/lib/libtvm_runtime.so && -f $ROOT/site/tvm_ffi/lib/libtvm_ffi_testing.so ]] \
  || die "pruning removed a runtime library"

if [[ $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == "$PY_VERSION" ]]; then
  log "byte-compiling the agent's dependencies with the host python$PY_VERSION"
  for package in "${PRECOMPILED[@]}"; do
    [[ -d $ROOT/site/$package ]] || die "wheel unpacked no site/$package"
    "$PYTHON" -m compileall -q -j 0 "$ROOT/site/$package" >&2
  done
fi

# The smoke test proves the sysroot imports what compiler/runner_main.py needs, on aarch64, in
# runtime-only mode, and that the agent's compiled dependencies (pydantic-core, cryptography,
# PyYAML) load on aarch64; as a side effect it leaves .pyc files for exactly those modules, which
# roughly halves the start-up of every later emulated run (runs then write no bytecode).
log "smoke test under qemu-aarch64-static"
SMOKE='
import json, os, platform, sys, tempfile, time
import numpy as np
import tvm
from tvm import runtime
from tvm.runtime.vm import VirtualMachine
assert platform.machine() == "aarch64", platform.machine()
assert tvm.base._RUNTIME_ONLY
with tempfile.TemporaryDirectory() as d:
    np.save(os.path.join(d, "a.npy"), np.arange(3, dtype="float32"))
    arr = runtime.tensor(np.load(os.path.join(d, "a.npy")), tvm.cpu(0))
    assert arr.numpy().tolist() == [0.0, 1.0, 2.0]
import pydantic, pydantic_core, pydantic_settings, paho.mqtt.client, prometheus_client
import click, yaml, platformdirs, packaging.version, rich
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"edgeloop"), b"edgeloop")
assert yaml.safe_load("a: [1, 2]") == {"a": [1, 2]}
class M(pydantic.BaseModel):
    n: int
assert M.model_validate({"n": "3"}).n == 3
print(f"python {platform.python_version()}, numpy {np.__version__}, tvm {tvm.__version__}, "
      f"pydantic {pydantic.VERSION} (core {pydantic_core.__version__})")
'
env -i PATH=/usr/bin:/bin HOME="$WORK" PYTHONNOUSERSITE=1 PYTHONPATH="$ROOT/site" \
  TVM_USE_RUNTIME_LIB=1 \
  qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python$PY_VERSION" -c "$SMOKE" >&2

{
  echo "format=$STAMP_FORMAT"
  echo "arch=aarch64"
  echo "recipe_sha256=$RECIPE"
  echo "suite=$SUITE"
  echo "built_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for pin in "${PINS[@]}"; do echo "deb:$pin"; done
  for wheel in "${WHEELS[@]}"; do echo "wheel:$wheel"; done
} >"$ROOT/$STAMP_NAME"

if [[ -e $DEST ]]; then
  log "replacing stale $DEST"
  mv "$DEST" "$WORK/stale"
fi
mv -T "$ROOT" "$DEST"
log "sysroot ready at $DEST ($(du -sh "$DEST" | cut -f1), $((SECONDS - START)) s)"

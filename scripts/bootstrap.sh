#!/usr/bin/env bash
# Install everything EdgeLoop's demo and tests need on a fresh Debian machine (idempotent).
#   apt: cross compilers, qemu-user-static, mosquitto, binutils (readelf), chromium (+driver)
#   pip: this project with its dev extras (torch pinned to the local CPU build)
#   cache: the aarch64 Python sysroot for qemu, and the armv7 runtime if its script exists
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf
              qemu-user-static mosquitto binutils
              chromium chromium-driver)  # headless browser of the dashboard tests
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: apt-get install ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >&2
fi

# PostgreSQL on 127.0.0.1:5432 (trust auth) for the fleet API tests: this machine kind runs
# one; start it if it is down, install a local one if there is none.
if ! command -v pg_isready >/dev/null 2>&1; then
  echo "bootstrap: installing PostgreSQL" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >&2
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    if ! grep -q "edgeloop tests" "$hba"; then
      { printf '# edgeloop tests: local trust\nhost all all 127.0.0.1/32 trust\n'; cat "$hba"; } \
        > "$hba.new" && $SUDO mv "$hba.new" "$hba"
    fi
  done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "bootstrap: starting PostgreSQL" >&2
  for version in /etc/postgresql/*; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start >&2 || true
  done
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi

PYTHON="${PYTHON:-python3}"
echo "bootstrap: pip install -e .[dev] with $($PYTHON --version)" >&2
$PYTHON -m pip install -q --disable-pip-version-check -e ".[dev]" >&2

echo "bootstrap: aarch64 sysroot for qemu" >&2
bash scripts/build-arm-sysroot.sh >&2
if [ -f scripts/build-armv7-runtime.sh ]; then
  echo "bootstrap: armv7 TVM runtime for qemu" >&2
  bash scripts/build-armv7-runtime.sh >&2
fi
echo "bootstrap: done" >&2

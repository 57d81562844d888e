"""Run Python on a foreign ISA under qemu-user, in a cached Debian sysroot.

Compiled aarch64 artifacts are checked on this x86_64 host by running
``compiler/runner_main.py`` with an aarch64 CPython under ``qemu-aarch64-static``:
no binfmt, no chroot. ``scripts/build-arm-sysroot.sh`` is the one recipe that builds
the sysroot (Debian bookworm arm64 python3.11 unpacked with ``dpkg -x``, plus the
aarch64 wheels of the TVM runtime and numpy in ``<sysroot>/site``); this module finds
it, builds it on demand, and spells the emulated command line. The sysroot lives in
``${EDGELOOP_CACHE_DIR:-~/.cache/edgeloop}/sysroots/<arch>`` and is never committed.

armv7 is known (``qemu-arm-static``) but has no Python sysroot: PyPI has no armv7
wheel of apache-tvm, so armv7 artifacts need a native runner instead.

Exceptions::

    EmulationError          exit_code 1: no sysroot for the arch, sysroot build failed
    ├── UnknownArchError    exit_code 2: an arch name not in the table
    └── QemuNotFoundError   exit_code 5: qemu-user binary missing (qemu-user-static)
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import CompilerError

#: The recipe that builds a sysroot; its sha256 is recorded in the stamp.
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build-arm-sysroot.sh"
#: Written last by the build script; a sysroot without it is not ready.
STAMP_NAME = ".edgeloop-sysroot-stamp"
#: 2: the sysroot also carries the device agent's dependencies (agent/emulation.py).
STAMP_FORMAT = "2"
PYTHON_VERSION = "3.11"

_ARCH_ALIASES: Mapping[str, str] = {
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7": "armv7",
    "armv7l": "armv7",
    "armhf": "armv7",
    "arm": "armv7",
}
_QEMU_BINARIES: Mapping[str, str] = {
    "aarch64": "qemu-aarch64-static",
    "armv7": "qemu-arm-static",
}
_NO_PYTHON_SYSROOT: Mapping[str, str] = {
    "armv7": "PyPI has no armv7 wheel (nor an sdist) of apache-tvm, so no Python "
    "sysroot can run the TVM runtime there; armv7 artifacts need a native runner",
}
# Host variables that would leak x86 paths or settings into the emulated process.
_HOST_ONLY_ENV_PREFIXES = ("PYTHON", "LD_", "QEMU_", "TVM_")


class EmulationError(CompilerError):
    """Running code for a foreign ISA under qemu-user is not possible here."""

    exit_code = 1


class UnknownArchError(EmulationError):
    """The architecture name is not one this module knows."""

    exit_code = 2


class QemuNotFoundError(EmulationError):
    """The qemu-user binary for the architecture is not on PATH."""

    exit_code = 5


@dataclass(frozen=True)
class SysrootSpec:
    """Where the sysroot of one architecture lives and what is inside it."""

    arch: str
    root: Path

    @property
    def python(self) -> Path:
        """The foreign interpreter, as a host path."""
        return self.root / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def site(self) -> Path:
        """The directory holding the unpacked foreign wheels."""
        return self.root / "site"

    @property
    def stamp(self) -> Path:
        """The stamp file that marks a finished build."""
        return self.root / STAMP_NAME


def canonical_arch(arch: str) -> str:
    """Map an architecture name or alias to ``aarch64`` or ``armv7``.

    Args:
        arch: e.g. ``aarch64``, ``arm64``, ``armv7``, ``armv7l``, ``armhf``, ``arm``.

    Returns:
        The canonical name.

    Raises:
        UnknownArchError: the name is not in the table.
    """
    try:
        return _ARCH_ALIASES[arch]
    except KeyError as err:
        choices = ", ".join(sorted(_ARCH_ALIASES))
        raise UnknownArchError(f"unknown architecture {arch!r}; choose from: {choices}") from err


def qemu_binary_name(arch: str) -> str:
    """Name the qemu-user binary that runs programs of ``arch``.

    Raises:
        UnknownArchError: the name is not in the table.
    """
    return _QEMU_BINARIES[canonical_arch(arch)]


def qemu_binary(arch: str, *, search_path: str | None = None) -> Path:
    """Find the qemu-user binary for ``arch``.

    Args:
        arch: an architecture name accepted by :func:`canonical_arch`.
        search_path: a PATH-style string to search; ``None`` means ``$PATH``.

    Returns:
        The path of the binary.

    Raises:
        UnknownArchError: the name is not in the table.
        QemuNotFoundError: the binary is not on the search path.
    """
    name = qemu_binary_name(arch)
    found = shutil.which(name, path=search_path)
    if found is None:
        raise QemuNotFoundError(
            f"{name} not found on PATH; it is needed to run {canonical_arch(arch)} "
            "code on this host: install the Debian package qemu-user-static "
            "(apt-get install qemu-user-static)"
        )
    return Path(found)


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return ``$EDGELOOP_CACHE_DIR``, else ``~/.cache/edgeloop``.

    Args:
        env: the environment to read; ``None`` means ``os.environ`` now.
    """
    env = os.environ if env is None else env
    configured = env.get("EDGELOOP_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "edgeloop"


def sysroot_spec(arch: str, cache_dir: Path | None = None) -> SysrootSpec:
    """Describe the sysroot of ``arch`` under ``cache_dir`` (default cache if None).

    Raises:
        UnknownArchError: the name is not in the table.
    """
    canonical = canonical_arch(arch)
    base = default_cache_dir() if cache_dir is None else cache_dir
    return SysrootSpec(arch=canonical, root=base.absolute() / "sysroots" / canonical)


def recipe_digest(script: Path = BUILD_SCRIPT) -> str:
    """Return the sha256 of the build script, as its stamp records it."""
    return hashlib.sha256(script.read_bytes()).hexdigest()


def read_stamp(path: Path) -> dict[str, str] | None:
    """Parse a ``key=value`` stamp file; ``None`` when it is missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def find_sysroot(
    arch: str, cache_dir: Path | None = None, *, script: Path = BUILD_SCRIPT
) -> Path | None:
    """Return the ready sysroot of ``arch``, or ``None``.

    Ready means: the stamp exists, has this format and arch, and (when the build
    script is present) records the sha256 of that script, so a changed recipe is
    never served by an old sysroot.

    Args:
        arch: an architecture name accepted by :func:`canonical_arch`.
        cache_dir: the cache root; ``None`` means :func:`default_cache_dir`.
        script: the build script whose digest the stamp must record.

    Returns:
        The sysroot directory, or ``None`` (always ``None`` for armv7).

    Raises:
        UnknownArchError: the name is not in the table.
    """
    spec = sysroot_spec(arch, cache_dir)
    if spec.arch in _NO_PYTHON_SYSROOT:
        return None
    stamp = read_stamp(spec.stamp)
    if stamp is None:
        return None
    if stamp.get("format") != STAMP_FORMAT or stamp.get("arch") != spec.arch:
        return None
    if script.is_file() and stamp.get("recipe_sha256") != recipe_digest(script):
        return None
    if not spec.python.is_file():
        return None
    return spec.root


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ensure_sysroot(
    arch: str,
    cache_dir: Path | None = None,
    *,
    log: Callable[[str], None] = _log_to_stderr,
    timeout_s: float = 1800.0,
    script: Path = BUILD_SCRIPT,
) -> Path:
    """Return the ready sysroot of ``arch``, building it first if needed.

    The build runs ``script`` (``scripts/build-arm-sysroot.sh``), which needs
    network access to Debian's apt repositories and PyPI; it takes the lock, so
    concurrent callers build once.

    Args:
        arch: an architecture name accepted by :func:`canonical_arch`.
        cache_dir: the cache root; ``None`` means :func:`default_cache_dir`.
        log: called with each progress line of the build.
        timeout_s: how long the build may take before it is killed.
        script: the build script.

    Returns:
        The sysroot directory.

    Raises:
        UnknownArchError: the name is not in the table.
        QemuNotFoundError: the qemu-user binary is missing.
        EmulationError: the arch has no Python sysroot, or the build failed.
    """
    spec = sysroot_spec(arch, cache_dir)
    if spec.arch in _NO_PYTHON_SYSROOT:
        raise EmulationError(f"no Python sysroot for {spec.arch}: {_NO_PYTHON_SYSROOT[spec.arch]}")
    found = find_sysroot(spec.arch, cache_dir, script=script)
    if found is not None:
        return found
    qemu_binary(spec.arch)
    if not script.is_file():
        raise EmulationError(f"sysroot build script {script} not found")
    _run_build(["bash", str(script), str(spec.root)], log=log, timeout_s=timeout_s)
    found = find_sysroot(spec.arch, cache_dir, script=script)
    if found is None:
        raise EmulationError(f"{script.name} finished but {spec.root} has no valid {STAMP_NAME}")
    return found


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # The build runs in its own session: end apt-get and pip with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run_build(argv: list[str], *, log: Callable[[str], None], timeout_s: float) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=20)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill() -> None:
        if proc.poll() is None:
            timed_out.set()
            _kill_group(proc)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            log(line)
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # log() raised: do not leave the build running
            _kill_group(proc)
            proc.wait()
    if timed_out.is_set():
        raise EmulationError(f"sysroot build timed out after {timeout_s:.0f} s")
    if returncode != 0:
        raise EmulationError(
            f"sysroot build {' '.join(argv)} failed with exit code {returncode}:\n"
            + "\n".join(tail)
        )


def emulated_python_command(
    arch: str,
    sysroot: Path,
    script: Path,
    args: list[str],
    *,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Build the argv and environment that run ``script`` with the foreign Python.

    The command is ``<qemu> -L <sysroot> <sysroot>/usr/bin/python3.11 <script>
    <args...>``. The environment is ``base_env`` without host-only variables
    (``PYTHON*``, ``LD_*``, ``QEMU_*``, ``TVM_*``: x86 paths would leak into the
    emulated process), plus ``PYTHONPATH`` at the sysroot's site dir, no user
    site, no bytecode writes into the shared cache, and the TVM runtime-only mode.

    Paths are passed through as host paths: qemu looks an absolute path up in the
    sysroot first and falls back to the host, so keep work files outside
    ``/usr``, ``/lib`` and ``/etc``.

    Args:
        arch: an architecture name accepted by :func:`canonical_arch`.
        sysroot: a ready sysroot, e.g. from :func:`ensure_sysroot`.
        script: the Python script to run.
        args: its arguments.
        base_env: the environment to start from; ``None`` means ``os.environ``.
            Its ``PATH`` is where qemu is looked for.

    Returns:
        ``(argv, env)`` for :func:`subprocess.run`.

    Raises:
        UnknownArchError: the name is not in the table.
        QemuNotFoundError: the qemu-user binary is missing.
        EmulationError: the arch has no Python sysroot.
    """
    canonical = canonical_arch(arch)
    if canonical in _NO_PYTHON_SYSROOT:
        raise EmulationError(f"no Python sysroot for {canonical}: {_NO_PYTHON_SYSROOT[canonical]}")
    source = os.environ if base_env is None else base_env
    qemu = qemu_binary(canonical, search_path=source.get("PATH"))
    spec = SysrootSpec(arch=canonical, root=sysroot.absolute())
    argv = [
        str(qemu),
        "-L",
        str(spec.root),
        str(spec.python),
        str(script.absolute()),
        *args,
    ]
    env = {
        key: value for key, value in source.items() if not key.startswith(_HOST_ONLY_ENV_PREFIXES)
    }
    env.update(
        PYTHONPATH=str(spec.site),
        PYTHONNOUSERSITE="1",
        PYTHONDONTWRITEBYTECODE="1",
        TVM_USE_RUNTIME_LIB="1",
    )
    return argv, env

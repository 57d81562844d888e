"""Run the device agent as an emulated aarch64 device: ``edgeloop-agent`` under qemu-user.

The aarch64 sysroot that ``compiler/emulation.py`` uses to verify ARM artifacts
(``scripts/build-arm-sysroot.sh``: Debian bookworm arm64 python3.11 plus, in ``site/``, the
aarch64 wheels of the TVM runtime and of every package the agent imports) also runs the
agent itself::

    qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 -m agent -v run --config C

with ``PYTHONPATH=SYSROOT/site:<this repository>`` and the TVM runtime-only mode. The process
is a real aarch64 CPython (``platform.machine()`` is ``aarch64``, its heartbeat says so) that
loads the aarch64 ``.so`` of a ``raspberry-pi/4b-aarch64`` artifact; ``/proc/PID/exe`` is
the qemu binary. Start-up takes tens of seconds (every module is emulated), inference a few
milliseconds per request for the demo's small models.

:func:`agent_command` spells the command line; :func:`unavailable_reason` says why an
emulated agent cannot run here (``None`` when it can).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from compiler import emulation

ARCH = "aarch64"
#: The hardware profile an emulated device reports (its artifacts are aarch64 .so files).
PROFILE = "raspberry-pi/4b-aarch64"
#: The repository root: the emulated Python imports ``agent``, ``compiler`` and ``edgeloop``
#: from here (they are pure Python; only their dependencies come from the sysroot).
REPO = Path(__file__).resolve().parents[1]
#: How long an emulated agent may take to start serving (imports run under emulation).
START_TIMEOUT_S = 180.0
# Packages of site/ that only a sysroot of STAMP_FORMAT 2 carries (the agent's imports).
_AGENT_PACKAGES = (
    "pydantic_core",
    "pydantic_settings",
    "paho",
    "prometheus_client",
    "cryptography",
)


def find_agent_sysroot(cache_dir: Path | None = None) -> Path | None:
    """The ready aarch64 sysroot, if it carries the agent's dependencies; else ``None``.

    Args:
        cache_dir: the cache root; ``None`` means ``$EDGELOOP_CACHE_DIR`` or
            ``~/.cache/edgeloop``.
    """
    root = emulation.find_sysroot(ARCH, cache_dir)
    if root is None:
        return None
    site = emulation.SysrootSpec(arch=ARCH, root=root).site
    if not all((site / package).is_dir() for package in _AGENT_PACKAGES):
        return None
    return root


def unavailable_reason(
    cache_dir: Path | None = None, *, search_path: str | None = None
) -> str | None:
    """Why an emulated aarch64 agent cannot run here, or ``None`` when it can.

    Args:
        cache_dir: the cache root (see :func:`find_agent_sysroot`).
        search_path: a PATH-style string to look for qemu in; ``None`` means ``$PATH``.
    """
    try:
        emulation.qemu_binary(ARCH, search_path=search_path)
    except emulation.EmulationError as err:
        return str(err)
    if find_agent_sysroot(cache_dir) is None:
        where = emulation.sysroot_spec(ARCH, cache_dir).root
        return (
            f"no aarch64 sysroot with the agent's dependencies at {where}; build it with "
            "scripts/build-arm-sysroot.sh (scripts/bootstrap.sh does)"
        )
    return None


def agent_command(
    sysroot: Path,
    args: Sequence[str],
    *,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run ``python -m agent ARGS`` as an aarch64 process.

    The environment is :func:`compiler.emulation.emulated_python_command`'s (host-only
    ``PYTHON*``, ``LD_*``, ``QEMU_*`` and ``TVM_*`` variables dropped, the TVM runtime-only
    mode, no bytecode writes into the shared sysroot) with this repository after the
    sysroot's site dir on ``PYTHONPATH`` and one OpenMP thread.

    Args:
        sysroot: a ready sysroot, e.g. from :func:`find_agent_sysroot`.
        args: the agent's command line after ``python -m agent``, e.g.
            ``["-v", "run", "--config", "agent.toml"]``.
        base_env: the environment to start from; ``None`` means ``os.environ``. Its
            ``PATH`` is where qemu is looked for.

    Returns:
        ``(argv, env)`` for :class:`subprocess.Popen` (run it with ``cwd`` anywhere: the
        repository is found through ``PYTHONPATH``).

    Raises:
        compiler.emulation.QemuNotFoundError: ``qemu-aarch64-static`` is not on ``PATH``.
    """
    # emulated_python_command runs a script; the agent is a package, so keep its qemu,
    # sysroot and interpreter words and put ``-m agent`` where the script would go.
    argv, env = emulation.emulated_python_command(
        ARCH, sysroot, REPO / "agent" / "__main__.py", [], base_env=base_env
    )
    interpreter = argv[:-1]
    env["PYTHONPATH"] = os.pathsep.join((env["PYTHONPATH"], str(REPO)))
    env["OMP_NUM_THREADS"] = "1"
    return [*interpreter, "-m", "agent", *args], env

"""Benchmark: what ``pip install edgeloop[agent]`` installs, and the agent's idle memory.

The issue asks that installing ``edgeloop[agent]`` pulls no torch, fastapi, sqlmodel or TVM
compiler, and that its installed size and idle RSS be measured. In a temporary directory:

1. ``python3 -m venv``, then ``pip install <repo>[agent]`` (a real, non-editable install of
   this checkout); list the distributions it installed, check that torch, fastapi,
   sqlmodel and apache-tvm (and onnx, the compiler's other heavy dependency) are absent,
   and measure site-packages: in all, the venv's own pip/setuptools, and edgeloop with its
   dependencies (per distribution, from each one's RECORD).
2. Install ``onnxruntime`` into the same venv as the device's model runtime (it is not part
   of the agent extra: a device installs the runtime its models need) and measure it.
3. Idle RSS (``VmRSS`` of ``/proc/<pid>/status``, sampled once a second after the process
   settled) of, each against a private Mosquitto (``fleet.broker.MosquittoProcess``):

   * **python sleeping** (peer): the venv's interpreter running ``time.sleep``;
   * **agent, no model**: ``<venv>/bin/edgeloop-agent run`` connected, nothing installed;
   * **agent + ORT model**: the same after ``edgeloop-agent install-artifact`` of the test
     MLP compiled for ONNX Runtime (``compile_model(..., runtime="onnxruntime")``, made by
     ``bench/serving_overhead.py --compile-worker`` with this checkout's compiler), after one
     inference over HTTP.
   * with ``--with-tvm``: a second venv with ``edgeloop[agent]`` plus ``apache-tvm`` (the
     wheel carries the compiler library too; the agent loads only the runtime-only
     library), serving the same MLP compiled for TVM.

It prints numbers and asserts none: a benchmark, not a test. Usage::

    python3 bench/agent_footprint.py                 # ~1.5 min (pip from the local index)
    python3 bench/agent_footprint.py --quick         # shorter settling
    python3 bench/agent_footprint.py --with-tvm --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.broker import MosquittoProcess

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("torch", "fastapi", "sqlmodel", "apache-tvm", "onnx")
VENV_BASE = ("pip", "setuptools", "wheel")
DEVICE = "dev-footprint"
PASSWORDS = {"fleet": "fleet-pw", DEVICE: "device-pw"}
PROFILE = "generic/x86_64"
MIB = 1024 * 1024
# The versions the compiler extra pins (pyproject.toml), so the bundle and the runtime match.
TVM_PINS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0")

# Run with the venv's interpreter: every installed distribution and the bytes of its files.
_SIZES = """
import importlib.metadata as md, json, os
out = {}
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    out[dist.metadata["Name"].lower().replace("_", "-")] = {"version": dist.version, "bytes": total}
print(json.dumps(out))
"""
# Heavy modules the agent must not import (checked in the venv after importing the agent).
_IMPORTS = """
import json, sys
import agent.cli, agent.service, agent.daemon, agent.server, agent.runtimes
heavy = ("torch", "tvm", "onnx", "fastapi", "sqlmodel", "onnxruntime", "httpx")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


@dataclass
class Venv:
    """A virtual environment and what is installed in it."""

    path: Path
    install_s: float = 0.0
    dists: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        """A console script of the venv."""
        return self.path / "bin" / name

    def pip_install(self, *requirements: str) -> float:
        """``pip install`` into the venv; returns the seconds it took."""
        started = time.monotonic()
        out = subprocess.run(
            [str(self.python), "-m", "pip", "install", "--quiet", *requirements],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"pip install {' '.join(requirements)} failed:\n{out.stderr[-3000:]}"
            )
        return time.monotonic() - started

    def refresh(self) -> dict[str, dict[str, Any]]:
        """Re-read the installed distributions and their sizes."""
        out = subprocess.run(
            [str(self.python), "-c", _SIZES], capture_output=True, text=True, check=True
        )
        self.dists = json.loads(out.stdout)
        return self.dists

    def site_packages_bytes(self) -> int:
        """Every file under site-packages (as ``du --apparent-size`` would count)."""
        (site,) = (self.path / "lib").glob("python3*/site-packages")
        return sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())


def make_venv(path: Path, *requirements: str) -> Venv:
    """Create a venv and install ``requirements`` into it."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    venv = Venv(path)
    venv.install_s = venv.pip_install(*requirements)
    venv.refresh()
    return venv


# ---------------------------------------------------------------- processes and RSS


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def settle_and_sample(pid: int, seconds: float) -> dict[str, Any]:
    """Wait ``seconds`` sampling once a second; the last sample, and the max VmRSS seen."""
    samples = []
    deadline = time.monotonic() + seconds
    while True:
        samples.append(proc_status(pid))
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    last = samples[-1]
    return {
        "vm_rss_mib": round(last["VmRSS"] / 1024, 1),
        "vm_hwm_mib": round(last["VmHWM"] / 1024, 1),
        "rss_anon_mib": round(last.get("RssAnon", 0) / 1024, 1),
        "rss_file_mib": round(last.get("RssFile", 0) / 1024, 1),
        "threads": last.get("Threads", 0),
        "max_vm_rss_mib": round(max(s["VmRSS"] for s in samples) / 1024, 1),
        "samples": len(samples),
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def measure_sleeping_python(venv: Venv, settle_s: float) -> dict[str, Any]:
    """RSS of the venv's bare interpreter sleeping (the floor of any Python process)."""
    proc = subprocess.Popen([str(venv.python), "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(0.5)
        return settle_and_sample(proc.pid, min(settle_s, 3.0))
    finally:
        _stop(proc)


@dataclass
class AgentRun:
    """One agent daemon started from a venv."""

    venv: Venv
    workdir: Path
    port: int
    public_key: Path

    @property
    def config(self) -> Path:
        """The agent's TOML config."""
        return self.workdir / "agent.toml"

    @property
    def state_dir(self) -> Path:
        """The agent's state directory."""
        return self.workdir / "state"

    def write_config(self) -> None:
        """Default settings except the broker, the state dir and a free HTTP port."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'device_id = "{DEVICE}"\n'
            f'profile = "{PROFILE}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'trusted_key = "{self.public_key}"\n'
            "[broker]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'username = "{DEVICE}"\npassword = "{PASSWORDS[DEVICE]}"\n'
            '[http]\nhost = "127.0.0.1"\nport = 0\n'
        )

    def install(self, bundle: Path) -> dict[str, Any]:
        """``edgeloop-agent install-artifact`` (offline install: verify, load, self-test)."""
        out = subprocess.run(
            [str(self.venv.bin("edgeloop-agent")), "install-artifact", str(bundle)]
            + ["--config", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"install-artifact failed ({out.returncode}): {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def install_and_measure(self, bundle: Path, *, settle_s: float) -> dict[str, Any]:
        """Install ``bundle`` offline, then measure the daemon serving it."""
        installed = self.install(bundle)
        return self.measure(settle_s=settle_s, model=str(installed["model"]))

    def measure(self, *, settle_s: float, model: str | None) -> dict[str, Any]:
        """Run the daemon, infer once if a model is installed, settle, sample RSS."""
        port_file = self.state_dir / "http.port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELOOP_", "TVM_"))}
        log = (self.workdir / "agent.log").open("ab")
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(self.venv.bin("edgeloop-agent")), "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.workdir,
        )
        try:
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "agent.log").read_text(errors="replace")
                    raise RuntimeError(f"agent did not start: {tail.strip()[-500:]}")
                time.sleep(0.02)
            ready_s = time.monotonic() - started
            http_port = int(port_file.read_text())
            if model is not None:
                _infer(http_port, model)
            result = settle_and_sample(proc.pid, settle_s)
            result["start_to_http_s"] = round(ready_s, 2)
            return result
        finally:
            _stop(proc)
            log.close()


def _infer(port: int, model: str) -> None:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.1] * 32}]}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise RuntimeError(f"inference answered {response.status}")


# ---------------------------------------------------------------- main


def compile_mlp(workdir: Path, runtimes: list[str]) -> tuple[dict[str, Path], Path]:
    """Compile the test MLP per runtime with this checkout's compiler (a child process)."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serving_overhead.py"),
            "--compile-worker",
            json.dumps({"workdir": str(workdir), "runtimes": runtimes}),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"compiling the MLP failed:\n{out.stderr[-3000:]}")
    bundles = {k: Path(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    return bundles, workdir / "keys" / "signing-key.pub"


def _heavy_imports(venv: Venv, cwd: Path) -> list[str] | str:
    """Heavy modules in ``sys.modules`` after importing the agent in ``venv`` (or the error)."""
    out = subprocess.run(
        [str(venv.python), "-c", _IMPORTS],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,  # not the checkout: import what was installed
    )
    if out.returncode != 0:
        return "import failed: " + out.stderr.strip().splitlines()[-1]
    modules: list[str] = json.loads(out.stdout)
    return modules


def _attempt(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure is recorded (and printed) instead of stopping the run."""
    try:
        return measure()
    except RuntimeError as err:
        return {"error": str(err).strip().splitlines()[-1]}


def _sizes(venv: Venv, names: list[str]) -> dict[str, Any]:
    return {
        name: {
            "version": venv.dists[name]["version"],
            "mib": round(venv.dists[name]["bytes"] / MIB, 2),
        }
        for name in sorted(names, key=lambda n: -int(venv.dists[n]["bytes"]))
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="5 s of settling instead of 15")
    parser.add_argument("--settle-s", type=float, default=15.0)
    parser.add_argument("--with-tvm", action="store_true", help="also a venv with apache-tvm")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)
    settle_s = 5.0 if args.quick else args.settle_s
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {"settle_s": settle_s, "requirement": f"{ROOT}[agent]"},
    }
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-footprint-") as tmp:
        work = Path(tmp)
        print("creating the agent venv (pip install .[agent]) ...", file=sys.stderr)
        venv = make_venv(work / "venv-agent", f"{ROOT}[agent]")
        installed = sorted(venv.dists)
        ours = [n for n in installed if n not in VENV_BASE]
        report["install"] = {
            "seconds": round(venv.install_s, 1),
            "distributions": _sizes(venv, ours),
            "absent": {name: name not in venv.dists for name in ABSENT},
            "heavy_modules_imported_by_agent": _heavy_imports(venv, work),
            "site_packages_mib": round(venv.site_packages_bytes() / MIB, 1),
            "venv_base_mib": round(
                sum(venv.dists[n]["bytes"] for n in VENV_BASE if n in venv.dists) / MIB, 1
            ),
            "edgeloop_and_deps_mib": round(sum(venv.dists[n]["bytes"] for n in ours) / MIB, 1),
        }
        runtimes = ["onnxruntime", "tvm"] if args.with_tvm else ["onnxruntime"]
        print(f"compiling the MLP for {', '.join(runtimes)} ...", file=sys.stderr)
        bundles, public_key = compile_mlp(work / "compile", runtimes)
        broker = MosquittoProcess(work / "broker", users=dict(PASSWORDS))
        broker.start()
        rss: dict[str, Any] = {}
        try:
            rss["python sleeping"] = measure_sleeping_python(venv, settle_s)
            bare = AgentRun(venv, work / "agent-bare", broker.port, public_key)
            bare.write_config()
            rss["agent, no model, [agent] only"] = _attempt(
                lambda: bare.measure(settle_s=settle_s, model=None)
            )
            if "error" in rss["agent, no model, [agent] only"] and "packaging" not in venv.dists:
                # agent/slots.py imports packaging, which edgeloop does not declare: add it
                # by hand to measure what the extra would cost once it is declared.
                venv.pip_install("packaging")
                venv.refresh()
                report["install"]["workaround"] = "pip install packaging (undeclared dependency)"
                report["install"]["import_check_as_installed"] = report["install"][
                    "heavy_modules_imported_by_agent"
                ]
                report["install"]["heavy_modules_imported_by_agent"] = _heavy_imports(venv, work)
                rss["agent, no model, [agent] + packaging"] = _attempt(
                    lambda: bare.measure(settle_s=settle_s, model=None)
                )
            agent_only = set(venv.dists)  # the extra (+ the workaround, if applied)
            print("installing onnxruntime into the venv ...", file=sys.stderr)
            ort_s = venv.pip_install("onnxruntime")
            added = sorted(set(venv.refresh()) - agent_only)
            report["onnxruntime"] = {
                "seconds": round(ort_s, 1),
                "distributions": _sizes(venv, added),
                "added_mib": round(sum(venv.dists[n]["bytes"] for n in added) / MIB, 1),
                "site_packages_mib": round(venv.site_packages_bytes() / MIB, 1),
            }
            rss["agent, no model, + onnxruntime"] = _attempt(
                lambda: bare.measure(settle_s=settle_s, model=None)
            )
            served = AgentRun(venv, work / "agent-ort", broker.port, public_key)
            served.write_config()
            rss["agent + ORT model"] = _attempt(
                lambda: (
                    served.install(bundles["onnxruntime"])
                    and served.measure(settle_s=settle_s, model="mlp")
                )
            )
            if args.with_tvm:
                print("creating a venv with apache-tvm ...", file=sys.stderr)
                tvm_venv = make_venv(
                    work / "venv-tvm",
                    f"{ROOT}[agent]",
                    *TVM_PINS,
                    *(["packaging"] if "workaround" in report["install"] else []),
                )
                tvm_added = sorted(set(tvm_venv.dists) - agent_only)
                report["apache_tvm"] = {
                    "seconds": round(tvm_venv.install_s, 1),
                    "distributions": _sizes(tvm_venv, tvm_added),
                    "added_mib": round(sum(tvm_venv.dists[n]["bytes"] for n in tvm_added) / MIB, 1),
                }
                tvm_run = AgentRun(tvm_venv, work / "agent-tvm", broker.port, public_key)
                tvm_run.write_config()
                rss["agent + TVM model (runtime-only)"] = _attempt(
                    lambda: (
                        tvm_run.install(bundles["tvm"])
                        and tvm_run.measure(settle_s=settle_s, model="mlp")
                    )
                )
        finally:
            broker.stop()
        report["rss"] = rss
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _print(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print(report: dict[str, Any]) -> None:
    inst = report["install"]
    print(f"\npip install edgeloop[agent]: {inst['seconds']} s")
    absent = ", ".join(f"{n} {'absent' if ok else 'PRESENT'}" for n, ok in inst["absent"].items())
    print(f"  {absent}")
    print(f"  heavy modules imported by the agent: {inst['heavy_modules_imported_by_agent']}")
    if "workaround" in inst:
        print(f"  as installed: {inst['import_check_as_installed']}")
        print(f"  workaround applied for what follows: {inst['workaround']}")
    print(
        f"  site-packages {inst['site_packages_mib']} MiB = edgeloop and its dependencies "
        f"{inst['edgeloop_and_deps_mib']} MiB + venv pip/setuptools {inst['venv_base_mib']} MiB"
    )
    for name, d in inst["distributions"].items():
        print(f"    {name:<20} {d['version']:<12} {d['mib']:>7.2f} MiB")
    ort = report["onnxruntime"]
    print(
        f"\n+ onnxruntime (the device's runtime, not in the extra): {ort['added_mib']} MiB in "
        f"{ort['seconds']} s -> site-packages {ort['site_packages_mib']} MiB"
    )
    for name, d in ort["distributions"].items():
        print(f"    {name:<20} {d['version']:<12} {d['mib']:>7.2f} MiB")
    if "apache_tvm" in report:
        tvm = report["apache_tvm"]
        print(f"\n+ apache-tvm (second venv): {tvm['added_mib']} MiB in {tvm['seconds']} s")
        for name, d in tvm["distributions"].items():
            print(f"    {name:<20} {d['version']:<12} {d['mib']:>7.2f} MiB")
    m = report["machine"]
    print(
        f"\nidle RSS after {report['settings']['settle_s']:g} s "
        f"(load average {m['loadavg_at_start'][0]} -> {m['loadavg_at_end'][0]})"
    )
    print(
        f"{'process':<37} | {'VmRSS MiB':>9} | {'anon':>6} | {'file':>6} | {'HWM':>6} | "
        f"{'threads':>7} | start s"
    )
    for name, r in report["rss"].items():
        if "error" in r:
            print(f"{name:<37} | FAILED: {r['error']}")
            continue
        print(
            f"{name:<37} | {r['vm_rss_mib']:>9.1f} | {r['rss_anon_mib']:>6.1f} | "
            f"{r['rss_file_mib']:>6.1f} | {r['vm_hwm_mib']:>6.1f} | {r['threads']:>7} | "
            f"{r.get('start_to_http_s', '')}"
        )


if __name__ == "__main__":
    sys.exit(main())

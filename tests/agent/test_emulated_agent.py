"""An emulated aarch64 device: the real agent under qemu-aarch64 (agent/emulation.py).

The agent runs with the sysroot's aarch64 python3.11 against a real Mosquitto, receives an
artifact compiled for ``raspberry-pi/4b-aarch64`` through a deploy job (chunked transfer,
signature check, swap, health check), serves it over OIP, and its outputs match ONNX
Runtime. That the process really is aarch64 is checked twice: ``/proc/PID/exe`` is the
qemu binary, and the heartbeat the agent publishes says ``arch: aarch64``.

Needs ``qemu-aarch64-static`` and the aarch64 sysroot with the agent's dependencies
(``scripts/build-arm-sysroot.sh``, which ``scripts/bootstrap.sh`` runs): skipped here when
either is missing, a failure under CI (``CI`` set), where bootstrap builds them. The fast
tests check the command line and the availability check without qemu.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import protocol
from agent.emulation import (
    PROFILE,
    REPO,
    agent_command,
    find_agent_sysroot,
    unavailable_reason,
)
from compiler import emulation
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import generate_keys
from tests.agent.harness import ROOT, AgentProcess, Fleet, make_fleet
from tests.compiler import models

X = np.random.default_rng(11).standard_normal((1, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def sysroot() -> Path:
    why = unavailable_reason()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated agent (scripts/bootstrap.sh): {why}")
        pytest.skip(f"no emulated aarch64 agent here: {why}")
    found = find_agent_sysroot()
    assert found is not None
    return found


@pytest.fixture(scope="module")
def arm_artifact(
    tmp_path_factory: pytest.TempPathFactory, sysroot: Path
) -> tuple[Path, Path, Path]:
    """(signed raspberry-pi/4b-aarch64 bundle of the test MLP, its ONNX model, public key)."""
    d = tmp_path_factory.mktemp("arm-artifact")
    keys = generate_keys(d / "keys")
    onnx = models.export_onnx("mlp", d / "mlp.onnx")
    result = compile_model(
        CompileRequest(
            model=onnx,
            profile=PROFILE,
            output=d / "bundle",
            model_name="mlp",
            model_version="1",
            runtime="tvm",
            trials=0,
            signing_key=keys.private,
            samples=2,
        ),
        settings=CompilerSettings(config_dir=d / "cfg", cache_dir=sysroot.parents[1]),
    )
    assert result.manifest.profile == PROFILE
    return result.output, onnx, keys.public


@pytest.fixture()
def fleet(tmp_path: Path, arm_artifact: tuple[Path, Path, Path]) -> Iterator[Fleet]:
    f = make_fleet(tmp_path / "fleet", arm_artifact[2])
    f.start()
    try:
        yield f
    finally:
        f.stop()


def _start_emulated(agent: AgentProcess, sysroot: Path) -> None:
    """``AgentProcess.start`` with the emulated command line (in its own session)."""
    config = agent.write_config()
    agent.log_path = agent.state_dir.parent / f"{agent.device_id}.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_AGENT_")}
    argv, env = agent_command(sysroot, ["-v", "run", "--config", str(config)], base_env=base)
    with agent.log_path.open("ab") as log:
        agent.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=log, env=env, start_new_session=True
        )


def _heartbeat(fleet: Fleet, device: str, timeout: float = 30.0) -> protocol.Heartbeat:
    """The next heartbeat of ``device`` as the fleet user receives it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("fleet", fleet.passwords["fleet"])
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", fleet.broker.port)
    client.subscribe(protocol.heartbeat(device), qos=1)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    assert got, f"no heartbeat from {device} in {timeout} s"
    return protocol.Heartbeat.model_validate(json.loads(got[-1]))


def _fake_qemu(tmp_path: Path) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu-aarch64-static"
    qemu.write_text("#!/bin/sh\nexit 0\n")
    qemu.chmod(0o755)
    return str(bindir)


def test_agent_command_runs_the_agent_package_in_the_sysroot(tmp_path: Path) -> None:
    bindir = _fake_qemu(tmp_path)
    sysroot = tmp_path / "sysroot"
    host = {"PATH": bindir, "PYTHONHOME": "/x86", "LD_LIBRARY_PATH": "/x86", "HOME": "/h"}
    argv, env = agent_command(sysroot, ["-v", "run"], base_env=host)
    python = sysroot / "usr" / "bin" / "python3.11"
    assert argv == [f"{bindir}/qemu-aarch64-static", "-L", str(sysroot), str(python)] + [
        "-m",
        "agent",
        "-v",
        "run",
    ]
    assert env["PYTHONPATH"] == f"{sysroot / 'site'}{os.pathsep}{REPO}"
    assert env["TVM_USE_RUNTIME_LIB"] == "1" and env["HOME"] == "/h"
    assert "PYTHONHOME" not in env and "LD_LIBRARY_PATH" not in env


def test_unavailable_reason_names_what_is_missing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert "qemu-user-static" in str(unavailable_reason(cache, search_path=str(tmp_path)))
    bindir = _fake_qemu(tmp_path)
    assert "build-arm-sysroot.sh" in str(unavailable_reason(cache, search_path=bindir))
    # A sysroot the compiler accepts, but without the agent's packages, is not enough.
    root = emulation.sysroot_spec("aarch64", cache).root
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_bytes(b"\x7fELF")
    (root / emulation.STAMP_NAME).write_text(
        f"format={emulation.STAMP_FORMAT}\narch=aarch64\n"
        f"recipe_sha256={emulation.recipe_digest()}\n"
    )
    assert emulation.find_sysroot("aarch64", cache) == root
    assert find_agent_sysroot(cache) is None
    for package in ("pydantic_core", "pydantic_settings", "paho", "prometheus_client"):
        (root / "site" / package).mkdir(parents=True)
    assert find_agent_sysroot(cache) is None  # cryptography still missing
    (root / "site" / "cryptography").mkdir()
    assert find_agent_sysroot(cache) == root
    assert unavailable_reason(cache, search_path=bindir) is None


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.mqtt
def test_emulated_aarch64_agent_serves_an_arm_artifact(
    fleet: Fleet, tmp_path: Path, sysroot: Path, arm_artifact: tuple[Path, Path, Path]
) -> None:
    import onnxruntime as ort

    bundle, onnx, _public = arm_artifact
    agent = AgentProcess(fleet, "dev-1", tmp_path / "devices" / "dev-1" / "state", profile=PROFILE)
    _start_emulated(agent, sysroot)
    assert agent.proc is not None
    try:
        started = time.monotonic()
        agent.wait_http(timeout=180)
        start_s = time.monotonic() - started
        exe = os.readlink(f"/proc/{agent.proc.pid}/exe")
        assert Path(exe).name == "qemu-aarch64-static", exe

        beat = _heartbeat(fleet, "dev-1")
        assert beat.hardware.arch == "aarch64", beat.hardware
        assert beat.hardware.profile == PROFILE

        artifact_id = fleet.store.put_bundle(bundle).artifact_id
        fleet.deploy("dev-1", artifact_id, job_id="job-arm")
        done = fleet.wait("job-arm", ("SUCCEEDED", "FAILED"), timeout=180)
        assert done.state == "SUCCEEDED", (done.reason, agent.log())

        result = agent.infer("mlp", {"input": X})
        got = np.asarray(result["outputs"][0]["data"], dtype=np.float32).reshape(1, -1)
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        want = np.asarray(session.run(None, {"input": X})[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        served = _heartbeat(fleet, "dev-1").models
        assert [(m.artifact_id, m.runtime) for m in served] == [(artifact_id, "tvm")], served
        # qemu-user maps the guest's libraries into its own address space: the artifact's
        # aarch64 .so (from the agent's model store) and the sysroot's aarch64 libtvm_runtime.
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        mapped = {line.split()[-1] for line in maps.splitlines() if line.endswith(".so")}
        assert any(m.startswith(str(agent.state_dir)) for m in mapped), sorted(mapped)
        assert str(sysroot / "site" / "tvm" / "lib" / "libtvm_runtime.so") in mapped
        print(f"emulated agent served OIP {start_s:.1f} s after its start")
    finally:
        # The whole session, as edgeloop.loop.stack stops it: SIGTERM reaches the guest.
        if agent.proc.poll() is None:
            os.killpg(agent.proc.pid, 15)
        code = agent.proc.wait(60)
    assert code == 0, agent.log()

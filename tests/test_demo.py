"""``edgeloop demo`` (the README's main command): the whole loop, its report, Ctrl-C, reruns.

The slow tests run ``python -m edgeloop demo --short`` as a subprocess with real components
(Mosquitto, fleet API + executor + chunk responder, cloud API + worker subprocess, ingest and
drift monitor, three agent processes) and assert the run's own outcome from its
``summary.json``. They carry every assertion of the former tests/test_dataloop_e2e.py (the
loop ran twice in CI; now once, through the product command):

* v1 trained (version 1), compiled, rolled out; good on clean digits, poor on inverted ones;
* the capture policy sketches on v1's baseline and reaches every device (revision 1);
* a drift alert for the shifted device only; clean devices scored below the threshold, the
  shifted one above; the scores reached the fleet with v1's artifact id;
* labeling tasks for the shifted device only; >= a quarter of its traffic labeled by the
  oracle; the retrain run starts with the last label (training, parent v1);
* the run trains in the worker subprocess, builds ``digits-relabeled`` (1,797 + labels),
  compiles v2 and deploys it through a canary (1 device, then the rest) to every device;
* accuracy on held-out inverted digits up by at least the margin.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgeloop.loop.config import LoopConfig, Outcome, config_json, make_config
from edgeloop.loop.report import PLOTS, render_html, summary_rows, write_report
from edgeloop.loop.stack import MARKER, STATE_FILE, DemoSetupError, prepare_workdir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LoopConfig(arm_profile=None)


# --------------------------------------------------------------------------- pure parts


def good_outcome() -> Outcome:
    """An outcome that passes every check (the shape a real run writes)."""
    return Outcome(
        config=config_json(CONFIG),
        started_at="2026-11-26T10:00:00+00:00",
        v1="a" * 64,
        v2="b" * 64,
        accuracy_clean=0.95,
        accuracy_before=0.05,
        accuracy_after=0.7,
        alert_devices=["cam-2"],
        max_drift={"cam-1": 0.2, "cam-2": 1.0, "cam-3": 0.18},
        fleet_max_drift={"cam-1": 0.2, "cam-2": 1.0, "cam-3": 0.18},
        labeled=250,
        retrain_state="deployed",
        retrain_version=2,
        canary_stages=[1, 2],
        serving_after={d: ["b" * 64] for d in CONFIG.devices},
        timeline=[
            {"t": 1.0, "deployment": "digits-v1", "device_id": "cam-1", "state": "QUEUED"},
            {"t": 2.0, "deployment": "digits-v1", "device_id": "cam-1", "state": "SUCCEEDED"},
        ],
        drift_scores=[
            {"device_id": d, "window_end": f"2026-11-26T10:00:0{i}+00:00", "score": s}
            for i, (d, s) in enumerate([("cam-1", 0.2), ("cam-2", 1.0), ("cam-3", 0.1)])
        ],
        latency_ms={"cam-1": [1.0, 2.0], "cam-2": [1.5], "cam-3": []},
        stages=[{"name": "train and compile v1", "start": 0.0, "end": 1.0}],
    )


def test_a_good_outcome_passes_every_check() -> None:
    outcome = good_outcome()
    assert all(outcome.checks().values()), outcome.checks()
    assert outcome.ok and outcome.to_json()["ok"] is True


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"alert_devices": ["cam-1", "cam-2"]}, "drift alert for the shifted device only"),
        ({"alert_devices": []}, "drift alert for the shifted device only"),
        ({"max_drift": {"cam-1": 0.6, "cam-2": 1.0, "cam-3": 0.1}}, "clean devices scored"),
        ({"max_drift": {"cam-2": 1.0}}, "clean devices scored"),
        ({"max_drift": {"cam-1": 0.1, "cam-2": 0.4, "cam-3": 0.1}}, "shifted device scored"),
        ({"fleet_max_drift": {"cam-2": 1.0}}, "drift scores reached the fleet"),
        ({"retrain_state": "failed"}, "retrained model deployed through a canary"),
        ({"canary_stages": [3]}, "retrained model deployed through a canary"),
        ({"canary_stages": [2, 1]}, "retrained model deployed through a canary"),
        ({"v2": "a" * 64}, "every device serves the retrained model"),
        ({"serving_after": {"cam-1": ["b" * 64]}}, "every device serves the retrained model"),
        ({"accuracy_after": 0.14}, "accuracy on shifted data up by the margin"),
    ],
)
def test_each_check_fails_on_its_own(change: dict[str, Any], failed: str) -> None:
    outcome = good_outcome()
    for key, value in change.items():
        setattr(outcome, key, value)
    failing = [name for name, ok in outcome.checks().items() if not ok]
    assert any(name.startswith(failed) for name in failing), failing
    assert not outcome.ok


def test_short_mode_drops_the_arm_profile() -> None:
    assert make_config(short=True, arm=True).profiles == ("generic/x86_64",)
    assert make_config(short=False, arm=False).profiles == ("generic/x86_64",)
    full = make_config(short=False, arm=True)
    assert full.profiles == ("generic/x86_64", "raspberry-pi/4b-aarch64")
    assert full.clean_devices == ("cam-1", "cam-3") and full.shifted == "cam-2"


def test_the_emulated_arm_device_needs_the_arm_profile() -> None:
    assert make_config(short=True, arm=True, emulate=True).emulated == ()
    assert make_config(short=False, arm=False, emulate=True).emulated == ()
    assert make_config(short=False, arm=True).emulated == ()
    full = make_config(short=False, arm=True, emulate=True)
    assert full.emulated == ("cam-3",)
    assert config_json(full)["device_profiles"] == {
        "cam-1": "generic/x86_64",
        "cam-2": "generic/x86_64",
        "cam-3": "raspberry-pi/4b-aarch64",
    }


def test_each_device_must_serve_its_profiles_retrained_artifact() -> None:
    full = make_config(short=False, arm=True, emulate=True)
    outcome = good_outcome()
    outcome.config = config_json(full)
    outcome.v1_variants = {"generic/x86_64": "a" * 64, "raspberry-pi/4b-aarch64": "c" * 64}
    outcome.v2_variants = {"generic/x86_64": "b" * 64, "raspberry-pi/4b-aarch64": "d" * 64}
    outcome.serving_after = {"cam-1": ["b" * 64], "cam-2": ["b" * 64], "cam-3": ["d" * 64]}
    assert outcome.ok, outcome.checks()
    rows = dict(summary_rows(outcome))
    assert rows["cam-3 (emulated)"] == "aarch64 under qemu-user, raspberry-pi/4b-aarch64"
    assert rows["v2 artifact for raspberry-pi/4b-aarch64"] == "d" * 16
    check = "every device serves the retrained model"
    outcome.serving_after["cam-3"] = ["b" * 64]  # the x86_64 artifact on the ARM device
    assert not outcome.checks()[check]
    outcome.serving_after["cam-3"] = ["d" * 64]
    outcome.v2_variants["raspberry-pi/4b-aarch64"] = "c" * 64  # v1's ARM artifact again
    outcome.serving_after["cam-3"] = ["c" * 64]
    assert not outcome.checks()[check]


def test_the_report_is_self_contained_with_every_plot(tmp_path: Path) -> None:
    outcome = good_outcome()
    summary = write_report(outcome, tmp_path / "out" / "report.html")
    page = (tmp_path / "out" / "report.html").read_text()
    assert_self_contained(page)
    assert json.loads(summary.read_text())["checks"] == outcome.checks()
    assert ("accuracy shifted", "0.050 -> 0.700 (needed +0.10)") in summary_rows(outcome)
    outcome.accuracy_after = 0.1
    assert "did NOT do its job" in render_html(outcome)


def assert_self_contained(page: str) -> None:
    """Four inline PNG plots with their captions, nothing fetched from elsewhere."""
    assert (
        len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]{500,}"', page))
        == 4
    )
    for name in PLOTS:
        assert f"<figcaption>{name}</figcaption>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "an external reference"
    assert "<link" not in page and "<script" not in page


def test_prepare_workdir_starts_clean_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    prepare_workdir(workdir)
    assert (workdir / MARKER).exists()
    (workdir / "cloud").mkdir()
    (workdir / "cloud" / "cloud.db").write_text("a previous run's state")
    prepare_workdir(workdir)  # a second run: everything from the first one is gone
    assert sorted(p.name for p in workdir.iterdir()) == [MARKER]

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoSetupError, match=r"--workdir .*home is not empty and was not made"):
        prepare_workdir(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(DemoSetupError, match="is a file"):
        prepare_workdir(foreign / "notes.txt")
    prepare_workdir(tmp_path / "empty-existing")  # an empty directory is fine


def test_a_foreign_workdir_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "edgeloop", "demo", "--short", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "not empty and was not made by `edgeloop demo`" in result.stderr
    assert (tmp_path / "precious.txt").exists()


def test_asking_for_a_missing_mosquitto_is_a_missing_dependency(tmp_path: Path) -> None:
    """``--broker mosquitto`` without it exits 5 (``auto`` would fall back to amqtt)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env["PATH"] = str(tmp_path / "empty-bin")  # no mosquitto (the interpreter is absolute)
    result = subprocess.run(
        [sys.executable, "-m", "edgeloop", "demo", "--short", "--broker", "mosquitto"]
        + ["--workdir", str(tmp_path / "w")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 5, result.stderr
    assert "mosquitto is not installed" in result.stderr
    assert "MQTT 5" in result.stderr


# --------------------------------------------------------------------------- the real loop


def _demo(workdir: Path, log: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env["COLUMNS"] = "200"
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeloop", "demo", "--short", "--workdir", str(workdir)]
            + list(extra),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _sessions_and_groups(ids: set[int]) -> list[int]:
    """Pids of live processes whose session or process group is one of ``ids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid, sid = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and (pgid in ids or sid in ids):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "work"


@pytest.mark.slow
@pytest.mark.mqtt
def test_ctrl_c_stops_every_process_and_frees_the_ports(workdir: Path, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    demo = _demo(workdir, log)
    state_file = workdir / STATE_FILE
    deadline = time.monotonic() + 240
    state: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:  # every service up, the worker busy training
            assert demo.poll() is None, log.read_text()
            if state_file.exists():
                state = json.loads(state_file.read_text())
                if state.get("stage") == "train and compile v1":
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"the demo did not reach the training stage:\n{log.read_text()}")
        time.sleep(2.0)  # into the training job
        children = dict(state["children"])
        assert {"mosquitto", "worker", "agent:cam-1", "agent:cam-2", "agent:cam-3"} <= set(children)
        assert all(_alive(pid) for pid in children.values())
        demo.send_signal(signal.SIGINT)
        rc = demo.wait(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = log.read_text()
    assert rc == 130, output
    assert "interrupted: every process the demo started is stopped" in output
    assert [name for name, pid in children.items() if _alive(pid)] == []
    # children run in sessions of their own (so a terminal's Ctrl-C reaches the demo only):
    # nothing is left in any of them, nor in the demo's own process group
    assert _sessions_and_groups({*children.values(), demo.pid}) == []
    for name, port in state["ports"].items():
        with socket.socket() as sock:  # binds only if nothing listens there any more
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as err:
                pytest.fail(f"{name}'s port {port} is still taken: {err}")


def _look_at_the_dashboard(output: str) -> None:
    """``--keep-running`` printed the dashboard and a key: the fleet and the queue are there."""
    import httpx

    url = re.search(r"dashboard: (\S+)/dashboard/", output)
    key = re.search(r"admin key: (\S+)", output)
    assert url and key, output
    with httpx.Client(base_url=url.group(1), timeout=30, follow_redirects=True) as client:
        page = client.post("/dashboard/login", data={"api_key": key.group(1), "next": ""})
        assert page.status_code == 200, page.text
        devices = client.get("/dashboard/devices").text
        assert all(f"cam-{i}" in devices for i in (1, 2, 3)), devices
        assert "online" in devices
        deployments = client.get("/dashboard/deployments").text
        assert "digits-v1" in deployments and "SUCCEEDED" in deployments, deployments
        drift = client.get("/dashboard/drift").text
        assert "cam-2" in drift and "ks" in drift, drift
        relabel = client.get("/dashboard/relabel", params={"state": "labeled"}).text
        assert "cloud service is not configured" not in relabel, relabel
        assert "labeled tasks" in relabel and "cam-2" in relabel, relabel


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_runs_the_whole_loop_and_reports(workdir: Path, tmp_path: Path) -> None:
    """Runs after the Ctrl-C test in the same work directory: a second run starts clean."""
    leftover = workdir / "cloud" / "cloud.db"
    interrupted_before = leftover.exists()
    log = tmp_path / "demo.log"
    started = time.monotonic()
    demo = _demo(workdir, log, "--keep-running")
    try:
        deadline = time.monotonic() + 600
        while "admin key: " not in log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(0.5)
        _look_at_the_dashboard(log.read_text())
        demo.send_signal(signal.SIGINT)  # ends the look around: a normal exit
        rc = demo.wait(timeout=120)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            demo.wait(60)
    output = log.read_text()
    assert rc == 0, output
    summary = json.loads((workdir / "summary.json").read_text())
    cfg, facts = summary["config"], summary["facts"]
    shifted, devices, threshold = cfg["shifted"], cfg["devices"], cfg["drift_threshold"]
    clean = [d for d in devices if d != shifted]
    assert summary["ok"] is True and all(summary["checks"].values()), summary["checks"]
    if interrupted_before:  # the first run's state did not leak into this one
        assert facts["v1_version"] == 1 and len(summary["stages"]) == 7

    # 1. train, compile, deploy v1
    assert facts["v1_version"] == 1
    assert summary["compiled"]["generic/x86_64"]["artifact_id"] == summary["v1"]
    assert "executed and checked" in summary["compiled"]["generic/x86_64"]["verification"]
    v1_states = {
        e["device_id"]: e["state"] for e in summary["timeline"] if e["deployment"] == "digits-v1"
    }
    assert v1_states == dict.fromkeys(devices, "SUCCEEDED")
    # 2. accuracy before
    assert summary["accuracy_clean"] >= 0.8, summary["accuracy_clean"]
    assert summary["accuracy_before"] <= 1.0 - cfg["margin"] - 0.1, summary["accuracy_before"]
    # 3. the capture policy on v1's baseline, delivered to every device
    assert facts["capture_policy"]["model_version"] == 1
    assert sorted(map(tuple, facts["capture_policy"]["devices"])) == [(d, 1, True) for d in devices]
    # 4. drift: the shifted device only, in the cloud and in the fleet
    assert summary["alert_devices"] == [shifted]
    assert all(summary["max_drift"][d] < threshold for d in clean), summary["max_drift"]
    assert summary["max_drift"][shifted] >= threshold
    for d in clean:
        assert [s for s in summary["drift_scores"] if s["device_id"] == d], d  # scored, low
    fleet_drift = facts["fleet_drift"]
    assert all(
        f["metric"] == "ks" and f["artifact_id"] == summary["v1"] for f in fleet_drift[shifted]
    )
    assert max(f["score"] for f in fleet_drift[shifted]) >= threshold
    for d in clean:
        assert fleet_drift[d] and max(f["score"] for f in fleet_drift[d]) < threshold
    # 5. oracle labels for the shifted device's samples only; the run starts with the last one
    assert facts["label_task_devices"] == [shifted]
    n_labels = summary["labeled"]
    assert n_labels >= (cfg["traffic"][1] - cfg["traffic"][0]) // 4
    assert facts["runs_after_labels"] == [
        {"state": "training", "n_labels": n_labels, "parent_version": 1}
    ]
    # 6. the run: worker subprocess trains, relabeled dataset, v2 compiled, canary deployment
    run = facts["retrain_run"]
    assert run["state"] == "deployed" and run["version"] == 2, run
    assert run["profiles"] == ["generic/x86_64"] and sorted(run["device_ids"]) == sorted(devices)
    assert facts["retrain_job"]["state"] == "SUCCEEDED" and facts["retrain_job"]["attempts"]
    assert facts["relabeled_dataset_sizes"] == [1797 + n_labels]
    assert summary["canary_stages"] == [1, len(devices) - 1]  # the canary, then the rest
    assert summary["v2"] and summary["v2"] != summary["v1"]
    assert summary["serving_after"] == {d: [summary["v2"]] for d in devices}
    v2_states = {
        e["device_id"]: e["state"] for e in summary["timeline"] if e["deployment"] != "digits-v1"
    }
    assert v2_states == dict.fromkeys(devices, "SUCCEEDED")
    # 7. accuracy on the held-out shifted data up by the margin
    assert summary["accuracy_after"] >= summary["accuracy_before"] + cfg["margin"]
    assert all(len(summary["latency_ms"][d]) >= 400 for d in devices)

    # the report, the table, live progress
    assert_self_contained((workdir / "report.html").read_text())
    assert "the loop did its job" in (workdir / "report.html").read_text()
    for stage in ("train and compile v1", "ALERT", "retrain, compile, canary redeploy"):
        assert stage in output
    assert "accuracy shifted" in output and "FAIL" not in output
    print(f"demo --short: {time.monotonic() - started:.0f} s")

"""The Mosquitto password-file adapter: hashed lines, atomic rewrites, reserved users."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.broker_auth import MosquittoPasswordFile, signal_reload
from fleet.errors import BrokerSyncError, InvalidRequestError


@pytest.fixture()
def reloads() -> list[int]:
    return []


@pytest.fixture()
def adapter(tmp_path: Path, reloads: list[int]) -> MosquittoPasswordFile:
    path = tmp_path / "passwd"
    path.write_text("fleet:$7$101$keep$keep\n")
    path.chmod(0o640)
    return MosquittoPasswordFile(path, reload=lambda: reloads.append(1))


def test_add_replace_remove(adapter: MosquittoPasswordFile, reloads: list[int]) -> None:
    adapter.add_device("dev-1", "pw-one-123456")
    adapter.add_device("dev-2", "pw-two-123456")
    first = adapter.password_file.read_text()
    assert adapter.users() == ["fleet", "dev-1", "dev-2"]
    assert "pw-one" not in first and "\ndev-1:$7$" in first
    assert first.startswith("fleet:$7$101$keep$keep\n")  # service users untouched
    adapter.add_device("dev-1", "pw-new-123456")  # a new password replaces the line
    assert adapter.users() == ["fleet", "dev-2", "dev-1"]
    assert adapter.password_file.read_text() != first
    adapter.remove_device("dev-2")
    adapter.remove_device("dev-2")  # idempotent
    assert adapter.users() == ["fleet", "dev-1"]
    assert len(reloads) == 5
    assert oct(adapter.password_file.stat().st_mode & 0o777) == "0o640"  # mode kept
    assert [p.name for p in adapter.password_file.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("username", "needle"),
    [
        (
            "fleet",
            "broker user 'fleet' is reserved for the fleet's services; reserved: fleet, responder",
        ),
        ("responder", "reserved: fleet, responder"),
        ("bad:name", "device id 'bad:name' is invalid"),
        ("", "device id '' is invalid"),
    ],
)
def test_refuses_service_users_and_bad_names(
    adapter: MosquittoPasswordFile, username: str, needle: str
) -> None:
    before = adapter.password_file.read_text()
    for call in (
        lambda: adapter.add_device(username, "pw-123456789"),
        lambda: adapter.remove_device(username),
    ):
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert needle in str(info.value)
    assert adapter.password_file.read_text() == before


def test_missing_mosquitto_passwd(tmp_path: Path) -> None:
    adapter = MosquittoPasswordFile(
        tmp_path / "passwd", reload=lambda: None, passwd_binary=str(tmp_path / "nope")
    )
    with pytest.raises(BrokerSyncError, match="could not hash the password of 'dev-1'"):
        adapter.add_device("dev-1", "pw-123456789")
    assert adapter.users() == []


def test_signal_reload_sends_sighup(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,sys,time\n"
            "signal.signal(signal.SIGHUP, lambda *a: sys.exit(42))\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        pid_file = tmp_path / "broker.pid"
        pid_file.write_text(f"{child.pid}\n")
        signal_reload(pid_file)()
        assert child.wait(timeout=10) == 42
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()


def test_signal_reload_names_a_bad_pid_file(tmp_path: Path) -> None:
    with pytest.raises(BrokerSyncError, match="pid file .*missing.pid"):
        signal_reload(tmp_path / "missing.pid")()
    (tmp_path / "junk.pid").write_text("not a pid")
    with pytest.raises(BrokerSyncError, match="junk.pid"):
        signal_reload(tmp_path / "junk.pid")()

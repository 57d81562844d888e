"""The Mosquitto password-file adapter: hashed lines, atomic rewrites, reserved users."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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


def test_in_process_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    import base64
    import shutil

    from fleet.broker_auth import mosquitto_hash

    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.skip("mosquitto_passwd is not installed")
    plain = tmp_path / "pw"
    plain.write_text("dev-1:s3cret-pw\n")
    subprocess.run([binary, "-U", str(plain)], check=True)
    line = plain.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_hash("s3cret-pw", salt=salt) == line
    assert mosquitto_hash("other", salt=salt) != line


def _concurrently(n: int, call: Callable[[int], None]) -> list[BaseException | None]:
    results: list[BaseException | None] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            call(i)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_concurrent_registrations_share_writes_and_reloads(tmp_path: Path) -> None:
    reloads: list[float] = []

    def slow_reload() -> None:  # a busy broker: changes pile up meanwhile
        time.sleep(0.2)
        reloads.append(time.monotonic())

    adapter = MosquittoPasswordFile(tmp_path / "passwd", reload=slow_reload)
    results = _concurrently(20, lambda i: adapter.add_device(f"dev-{i}", f"pw-{i}-123456"))
    assert results == [None] * 20
    assert sorted(adapter.users()) == sorted(f"dev-{i}" for i in range(20))
    assert 1 <= len(reloads) <= 5 and adapter.writes == len(reloads)  # not one per device


def test_a_failed_reload_fails_every_change_of_its_batch(tmp_path: Path) -> None:
    def broken() -> None:
        time.sleep(0.1)
        raise BrokerSyncError("broker gone")

    adapter = MosquittoPasswordFile(tmp_path / "passwd", reload=broken)
    results = _concurrently(5, lambda i: adapter.add_device(f"dev-{i}", f"pw-{i}-123456"))
    assert all(isinstance(r, BrokerSyncError) for r in results), results

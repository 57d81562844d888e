"""``edgeloop-agent`` offline commands: air-gap install, rollback, status, bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.bundle import pack_bundle
from tests.agent.conftest import Artifacts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, artifacts: Artifacts, **extra: str) -> Path:
    config = tmp_path / "agent.toml"
    lines = [
        'device_id = "dev-9"',
        'profile = "generic/x86_64"',
        f'state_dir = "{tmp_path / "state"}"',
        f'trusted_key = "{artifacts.public}"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_install_rollback_status(tmp_path: Path, artifacts: Artifacts) -> None:
    config = str(_config(tmp_path, artifacts))
    first = _agent("install-artifact", str(artifacts.v1), "--config", config)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["version"] == "1"
    tar = tmp_path / "v2.tar"
    pack_bundle(artifacts.v2, tar)
    second = _agent("install-artifact", str(tar), "--config", config)
    assert second.returncode == 0, second.stderr
    status = json.loads(_agent("status", "--config", config).stdout)
    assert status["mlp"]["active"]["version"] == "2"
    assert status["mlp"]["last_known_good"]["version"] == "1"

    older = _agent("install-artifact", str(artifacts.v1), "--config", config)
    assert older.returncode == 3 and "older than the installed 2" in older.stderr
    wrong = _agent("install-artifact", str(artifacts.wrong_profile), "--config", config)
    assert wrong.returncode == 3 and "raspberry-pi/4b-aarch64" in wrong.stderr
    foreign = _agent("install-artifact", str(artifacts.other_key_bundle), "--config", config)
    assert foreign.returncode == 3 and "signed with key" in foreign.stderr
    assert (
        json.loads(_agent("status", "--config", config).stdout)["mlp"]["active"]["version"] == "2"
    )

    back = _agent("rollback", "mlp", "--config", config)
    assert back.returncode == 0 and json.loads(back.stdout)["version"] == "1"
    missing = _agent("rollback", "nothing", "--config", config)
    assert missing.returncode == 2 and "no last-known-good" in missing.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"surprise": "1"}, "surprise: Extra inputs are not permitted"),
        ({"heartbeat_interval_s": "-1"}, "heartbeat_interval_s: Input should be greater than 0"),
    ],
)
def test_bad_config_is_a_usage_error(
    tmp_path: Path, artifacts: Artifacts, extra: dict[str, str], message: str
) -> None:
    result = _agent("status", "--config", str(_config(tmp_path, artifacts, **extra)))
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_config_and_bad_device_id(tmp_path: Path, artifacts: Artifacts) -> None:
    missing = _agent("status", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    config = _config(tmp_path, artifacts)
    config.write_text(config.read_text().replace('"dev-9"', '"dev 9"'))
    bad = _agent("status", "--config", str(config))
    assert bad.returncode == 2 and "device id 'dev 9' is invalid" in bad.stderr

"""``edgeloop demo`` (the README's main command) on the host profile, delivery included."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeloop.cli import cli


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_compiles_delivers_and_answers(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        cli, ["demo", "-o", str(out), "--profile", "generic/x86_64", "--no-emulation-setup"]
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "yes, native x86_64" in result.stdout
    assert "delivery: job SUCCEEDED" in result.stdout
    assert "max |agent - ONNX Runtime| = 0.00e+00" in result.stdout or "e-0" in result.stdout
    assert (out / "generic__x86_64" / "manifest.json").exists()
    again = CliRunner().invoke(
        cli, ["demo", "-o", str(out), "--profile", "generic/x86_64", "--no-emulation-setup"]
    )
    assert again.exit_code == 0, again.output

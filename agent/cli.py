"""``edgeloop-agent``: the device-side command.

The daemon (MQTT delivery, atomic swap, local inference) is issue 3; what a device can do
today is verify an artifact bundle with nothing but the core dependencies (no TVM compiler,
no torch), exactly as the daemon will before loading one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import edgeloop


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeloop.__version__, prog_name="edgeloop-agent")
def cli() -> None:
    """EdgeLoop device agent."""


@cli.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    type=click.Path(path_type=Path),
    required=True,
    help="The fleet's ed25519 public key (PEM).",
)
@click.option("--profile", default=None, help="Refuse artifacts built for another profile.")
def verify_command(path: Path, public_key: Path, profile: str | None) -> None:
    """Verify an artifact's signature and file hashes; print its id and entry as JSON."""
    from compiler.bundle import verify_bundle
    from compiler.errors import ArtifactError, CompilerError
    from compiler.signing import load_public_key

    try:
        verified = verify_bundle(path, load_public_key(public_key))
        if profile is not None and verified.manifest.profile != profile:
            raise ArtifactError(
                f"artifact is built for profile {verified.manifest.profile!r}; "
                f"this device is {profile!r}"
            )
    except CompilerError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    click.echo(
        json.dumps(
            {
                "artifact_id": verified.artifact_id,
                "profile": verified.manifest.profile,
                "runtime": verified.manifest.runtime,
                "entry": verified.manifest.entry,
            }
        )
    )


def main() -> None:
    """Console-script entry point."""
    cli()

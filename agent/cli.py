"""``edgeloop-agent``: run the daemon, install or roll back models offline, verify bundles.

Exit codes: 0 ok, 1 operational error, 2 usage or configuration error, 3 invalid or refused
artifact, 5 missing runtime dependency.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

import edgeloop
from agent.config import AgentSettings, load_settings

log = logging.getLogger("agent")


def _settings(config: Path | None) -> AgentSettings:
    from pydantic import ValidationError

    try:
        return load_settings(config)
    except FileNotFoundError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        click.echo(f"error: invalid agent configuration: {problems}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeloop.__version__, prog_name="edgeloop-agent")
@click.option("-v", "--verbose", count=True, help="More logging on stderr.")
def cli(verbose: int) -> None:
    """EdgeLoop device agent."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


_config_option = click.option(
    "-c",
    "--config",
    type=click.Path(path_type=Path),
    default=None,
    help="agent.toml (EDGELOOP_AGENT_* environment variables override it).",
)


@cli.command("run")
@_config_option
def run_command(config: Path | None) -> None:
    """Run the daemon until SIGTERM/SIGINT (SIGHUP reloads models from disk)."""
    from agent.service import build_agent

    settings = _settings(config)
    agent, server = build_agent(settings)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.load_active_models())
    agent.start()
    port = server.start(agent.settings.http.host, agent.settings.http.port)
    (agent.settings.state_dir / "agent.pid").write_text(str(os.getpid()))
    (agent.settings.state_dir / "http.port").write_text(str(port))
    log.warning("agent %s serving OIP on %s:%d", agent.device_id, agent.settings.http.host, port)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
        agent.stop(clean=True)
        (agent.settings.state_dir / "agent.pid").unlink(missing_ok=True)


@cli.command("install-artifact")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_config_option
def install_command(path: Path, config: Path | None) -> None:
    """Install a signed bundle (directory or transfer .tar) from a file, air-gapped."""
    from agent.daemon import JobFailed
    from agent.service import build_agent
    from compiler.errors import CompilerError

    agent, _server = build_agent(_settings(config))
    try:
        installed = agent.install_local(path)
    except (JobFailed, CompilerError) as err:
        click.echo(f"error: refused {path}: {err}", err=True)
        sys.exit(3)
    _signal_running(agent.settings.state_dir)
    click.echo(
        json.dumps(
            {
                "model": installed.name,
                "version": installed.manifest.model.version,
                "artifact_id": installed.artifact_id,
            }
        )
    )


@cli.command("rollback")
@click.argument("model")
@_config_option
def rollback_command(model: str, config: Path | None) -> None:
    """Switch MODEL back to its last-known-good version (works offline)."""
    from agent.slots import ModelStore, SlotError

    settings = _settings(config)
    store = ModelStore(settings.state_dir)
    try:
        target = store.rollback(model)
    except SlotError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    _signal_running(settings.state_dir)
    click.echo(
        json.dumps(
            {
                "model": model,
                "version": target.manifest.model.version,
                "artifact_id": target.artifact_id,
            }
        )
    )


@cli.command("status")
@_config_option
def status_command(config: Path | None) -> None:
    """Print the installed models (active and last-known-good) as JSON."""
    from agent.slots import ModelStore

    settings = _settings(config)
    store = ModelStore(settings.state_dir)
    out = {}
    for name in store.models():
        active, lkg = store.active(name), store.last_known_good(name)
        out[name] = {
            "active": {"version": active.manifest.model.version, "artifact_id": active.artifact_id}
            if active
            else None,
            "last_known_good": {
                "version": lkg.manifest.model.version,
                "artifact_id": lkg.artifact_id,
            }
            if lkg
            else None,
        }
    click.echo(json.dumps(out, indent=2))


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


def _signal_running(state_dir: Path) -> None:
    """Ask a running daemon (pid file) to reload its models from disk."""
    try:
        pid = int((state_dir / "agent.pid").read_text())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console-script entry point."""
    cli()

"""The ``edgeloop`` command: a root group that mounts each role's commands."""

from __future__ import annotations

import logging

import click

import edgeloop


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edgeloop.__version__, prog_name="edgeloop")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """EdgeLoop: compile, deploy, monitor and retrain ML models on edge fleets."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _mount() -> None:
    from cloud.cli import register as register_cloud
    from cloud.dataloop.cli import register as register_dataloop
    from compiler.cli import register
    from edgeloop.demo import demo_command
    from fleet.cli import register as register_fleet

    register(cli)
    register_fleet(cli)
    register_cloud(cli)
    register_dataloop(cli)
    cli.add_command(demo_command)


_mount()


def main() -> None:
    """Console-script entry point."""
    cli()

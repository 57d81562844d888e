"""``edgeloop demo``: the whole loop on this machine, with embedded defaults only.

Starts a broker (Mosquitto, else the embedded amqtt one, MQTT 3.1.1: --broker), the fleet
API (SQLite, local artifact store), the cloud API with one worker process and the drift
monitor, and three agents (without --short or --no-arm, and when the aarch64 sysroot and
qemu are here, cam-3 is an emulated Raspberry Pi 4: its agent runs under qemu-aarch64 and
serves the ARM artifact); trains the digits model, compiles it for the host (and an ARM
profile, verified under qemu when the aarch64 sysroot exists), rolls it out with a canary,
sends OIP traffic, inverts the inputs of one device, shows the drift alert, relabels that
device's captured samples with an oracle, retrains, redeploys through a canary and measures
accuracy again. Ends with a summary table, ``report.html`` (self-contained, four plots) and
``summary.json``. The library side is ``edgeloop.loop``.

Exit codes: 0 the loop did its job, 1 a step failed or a check did not pass, 2 usage,
5 a missing dependency (the broker asked for, matplotlib), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click

EXIT_FAILED, EXIT_MISSING, EXIT_INTERRUPTED = 1, 5, 130


def default_workdir() -> Path:
    """Where the demo works unless told otherwise (emptied at the start of each run)."""
    import platformdirs

    return platformdirs.user_data_path("edgeloop") / "demo"


class RichProgress:
    """Live progress on stderr: a spinner per stage, its notes, a tick with its duration."""

    def __init__(self, console: Any, on_stage: Callable[[str], None] | None = None) -> None:
        self.console = console
        self.on_stage = on_stage
        self.started = time.monotonic()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage is not None:
            self.on_stage(name)
        begin = time.monotonic()
        with self.console.status(f"[bold]{name}[/] ...", spinner="dots"):
            yield
        self.console.print(
            f"[green]✓[/] [bold]{name}[/] [dim]({time.monotonic() - begin:.1f} s, "
            f"at {time.monotonic() - self.started:.0f} s)[/]",
            highlight=False,
        )

    def note(self, message: str) -> None:
        self.console.print(f"  [dim]·[/] {message}", highlight=False)


class _Interrupts:
    """The first SIGINT raises KeyboardInterrupt; later ones only say cleanup is running."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt
        self.console.print("[yellow]still stopping the demo's processes...[/]")


def run_demo(
    *,
    workdir: Path,
    report: Path,
    short: bool,
    arm: bool,
    err: Any,
    out: Any,
    broker: str = "auto",
    keep_running: bool = False,
) -> int:
    """Run the demo end to end; returns the exit code (see the module docstring).

    ``broker``: ``auto`` (Mosquitto if installed, else the embedded amqtt broker, MQTT
    3.1.1), ``mosquitto`` or ``embedded``.
    """
    from edgeloop.loop.config import make_config
    from edgeloop.loop.report import print_summary, write_report
    from edgeloop.loop.scenario import LoopError, run_loop
    from edgeloop.loop.stack import STATE_FILE, DemoSetupError, StateFile, prepare_workdir

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        err.print("matplotlib is missing: pip install 'edgeloop[demo]'")
        return EXIT_MISSING
    config = make_config(short=short, arm=arm)
    if config.arm_profile:
        from agent.emulation import unavailable_reason
        from compiler import emulation
        from compiler.settings import CompilerSettings

        cache_dir = CompilerSettings().cache_dir
        if emulation.find_sysroot("aarch64", cache_dir) is None:
            err.print(
                f"[yellow]no aarch64 sysroot: the {config.arm_profile} artifact is compiled "
                "but not executed, and every agent runs the host profile (build it: "
                "scripts/build-arm-sysroot.sh, see docs/demo.md)[/]"
            )
        elif (why := unavailable_reason(cache_dir)) is not None:
            err.print(f"[yellow]no emulated ARM device: {why}[/]")
        else:
            config = make_config(short=short, arm=arm, emulate=True)
    interrupts = _Interrupts(err)
    previous = signal.signal(signal.SIGINT, interrupts)
    try:
        try:
            prepare_workdir(workdir)
        except DemoSetupError as error:
            err.print(f"[red]error:[/] {error}")
            return 2
        state = StateFile(workdir / STATE_FILE)
        progress = RichProgress(err, on_stage=state.stage)
        err.rule(f"[bold]EdgeLoop demo{' (short)' if short else ''}[/] in {workdir}")
        from edgeloop.loop.stack import start_stack

        try:
            with progress.stage("start broker, fleet, cloud and agents"):
                stack_cm = start_stack(
                    workdir, config, state=state, say=progress.note, broker_choice=broker
                )
                stack = stack_cm.__enter__()
            try:
                outcome = run_loop(stack, config, progress)
                if keep_running:
                    with progress.stage("write the report"):
                        write_report(outcome, report)
                    print_summary(outcome, out)
                    _serve_until_interrupted(stack, report, out)
                    interrupts.count = 0  # that Ctrl-C ended the look around, not the demo
            except BaseException:
                with progress.stage("stop every service"):
                    stack_cm.__exit__(*sys.exc_info())
                raise
            with progress.stage("stop every service"):
                stack_cm.__exit__(None, None, None)
        except DemoSetupError as error:
            err.print(f"[red]error:[/] {error}")
            return EXIT_MISSING if "not installed" in str(error) else EXIT_FAILED
        except LoopError as error:
            err.print(f"[red]the loop failed:[/] {error}")
            err.print(f"logs under {workdir}")
            return EXIT_FAILED
        with progress.stage("write the report"):
            summary = write_report(outcome, report)
        if not keep_running:
            print_summary(outcome, out)
        out.print(f"report: {report}\nsummary: {summary}", highlight=False)
        return 0 if outcome.ok else EXIT_FAILED
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: every process the demo started is stopped[/]")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)


def _serve_until_interrupted(stack: Any, report: Path, out: Any) -> None:
    """Leave every service up for a look around (the dashboard) until Ctrl-C."""
    out.print(
        f"\n[bold]the services keep running[/] (Ctrl-C stops them)\n"
        f"  dashboard: {stack.fleet_url}/dashboard/  (sign in with the admin key below)\n"
        f"  admin key: {stack.fleet_token}\n"
        f"  fleet API: {stack.fleet_url}/docs   cloud API: {stack.cloud_url}/docs\n"
        f"  report:    {report}",
        highlight=False,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        out.print("stopping the services", highlight=False)


@click.command("demo")
@click.option(
    "--short", is_flag=True, help="CI mode: the host profile only (no ARM compile under qemu)."
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Work directory, emptied at the start of each run [default: the user data dir's "
    "edgeloop/demo].",
)
@click.option("--no-arm", is_flag=True, help="Do not compile for the ARM profile.")
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where the HTML report goes (summary.json next to it) [default: WORKDIR/report.html].",
)
@click.option(
    "--broker",
    type=click.Choice(["auto", "mosquitto", "embedded"]),
    default="auto",
    show_default=True,
    help="MQTT broker: Mosquitto (MQTT 5), the embedded amqtt broker (MQTT 3.1.1, no "
    "shared subscriptions; pip install 'edgeloop[demo]'), or auto: Mosquitto if installed.",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the loop, keep the services up and print the dashboard's address and an "
    "admin key; Ctrl-C stops them.",
)
def demo_command(
    short: bool,
    workdir: Path | None,
    no_arm: bool,
    report: Path | None,
    broker: str,
    keep_running: bool,
) -> None:
    """Run the whole loop here: train, compile, deploy with a canary, OIP traffic, drift on
    one device, alert, oracle relabel, retrain, redeploy; then a summary and an HTML report."""
    from rich.console import Console

    workdir = (workdir or default_workdir()).resolve()
    report = (report or workdir / "report.html").resolve()
    code = run_demo(
        workdir=workdir,
        report=report,
        short=short,
        arm=not no_arm,
        err=Console(stderr=True),
        out=Console(),
        broker=broker,
        keep_running=keep_running,
    )
    sys.exit(code)

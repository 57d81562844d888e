"""``edgeloop demo``: the main job so far, on embedded defaults.

Compiles the shipped example model for the host profile and for ARM profiles, verifies each
on its target ISA (natively, or under qemu-user), and prints the report. Uses the default
signing key, creating it on first use, and writes to ``./edgeloop-demo`` (replaced each run).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

import click

_DEFAULT_PROFILES = ("generic/x86_64", "raspberry-pi/4b-aarch64", "raspberry-pi/3b-armv7")


def example_model(name: str = "digits_cnn.onnx") -> Path:
    """Path of a shipped example model (checkout or installed wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "examples" / "models" / name
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("edgeloop") / "_examples" / name))


@click.command("demo")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(path_type=Path),
    default=Path("edgeloop-demo"),
    show_default=True,
    help="Where the demo writes its artifacts (replaced each run).",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    default=_DEFAULT_PROFILES,
    show_default=True,
    help="Profiles to compile for (repeatable).",
)
@click.option(
    "--no-emulation-setup",
    is_flag=True,
    help="Do not build the aarch64 qemu sysroot if it is missing.",
)
@click.option(
    "--no-delivery",
    "delivery",
    flag_value=False,
    default=True,
    help="Skip delivering the host artifact to an agent over MQTT.",
)
def demo_command(
    output_dir: Path, profiles: tuple[str, ...], no_emulation_setup: bool, delivery: bool
) -> None:
    """Compile the example model for the host and ARM profiles, verify, and report; then
    deliver the host artifact to an agent over a private MQTT broker and query it."""
    from compiler import emulation
    from compiler.cli import err_console, handle_errors, out_console, print_report
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.settings import CompilerSettings
    from compiler.signing import KeyPaths, generate_keys

    @handle_errors
    def run() -> None:
        settings = CompilerSettings()
        keys = KeyPaths.in_dir(settings.keys_dir)
        if not keys.private.exists():
            generate_keys(settings.keys_dir)
            err_console.print(f"created the default signing key in {settings.keys_dir}")
        if not no_emulation_setup and emulation.find_sysroot("aarch64", settings.cache_dir) is None:
            err_console.print("building the aarch64 Python sysroot for qemu (first run only)...")
            emulation.ensure_sysroot("aarch64", settings.cache_dir)
        model = example_model()
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in profiles:
            out = output_dir / name.replace("/", "__")
            err_console.rule(f"[bold]{name}")
            result = compile_model(
                CompileRequest(
                    model=model,
                    profile=name,
                    output=out,
                    model_name="digits-cnn",
                    trials=0,
                    force=True,
                ),
                settings=settings,
                step=lambda msg: err_console.print(f"[dim]·[/] {msg}", highlight=False),
            )
            print_report(
                result.output,
                result.artifact_id,
                result.manifest.model_dump(mode="json"),
                result.report,
            )
        if delivery and "generic/x86_64" in profiles:
            _deliver(output_dir, settings, model, err_console, out_console)
        out_console.print(
            f"\nartifacts in {output_dir.resolve()}; "
            f"verify one with: edgeloop artifact verify "
            f"{output_dir / profiles[0].replace('/', '__')}"
        )

    run()
    sys.exit(0)


def _deliver(output_dir: Path, settings: Any, model: Path, err: Any, out: Any) -> None:
    import shutil

    from compiler.signing import KeyPaths
    from edgeloop.delivery_demo import run_delivery

    if shutil.which("mosquitto") is None:
        err.print("skipping delivery: mosquitto is not installed (apt-get install mosquitto)")
        return
    err.rule("[bold]delivery over MQTT")
    workdir = output_dir / "delivery"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    result = run_delivery(
        workdir=workdir,
        bundle=output_dir / "generic__x86_64",
        public_key=KeyPaths.in_dir(settings.keys_dir).public,
        onnx_model=model,
        say=lambda msg: err.print(f"[dim]·[/] {msg}", highlight=False),
    )
    diff = (
        max(abs(a - b) for a, b in zip(result.outputs, result.reference, strict=True))
        if result.outputs
        else float("nan")
    )
    out.print(
        f"delivery: job {result.job_state} in {result.seconds:.2f} s ({result.chunks} chunks); "
        f"agent answered OIP with model version {result.model_version}, "
        f"max |agent - ONNX Runtime| = {diff:.2e}"
        + (f"; reason: {result.job_reason}" if result.job_reason else ""),
        highlight=False,
    )
    if result.job_state != "SUCCEEDED" or not diff < 1e-3:
        raise SystemExit(1)

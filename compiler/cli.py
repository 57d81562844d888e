"""CLI commands of the compiler: ``profiles``, ``compile``, ``keys``, ``artifact``.

Thin: each command unpacks options and calls one library function. Exit codes come from
the exception classes in ``compiler.errors`` (0 ok, 1 operational, 2 usage, 3 invalid
input, 4 build or verification failed, 5 missing dependency), translated in one place.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from rich.console import Console
from rich.table import Table

from compiler.errors import CompilerError, UsageError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)
out_console = Console()


def handle_errors(func: F) -> F:
    """Turn CompilerError into its exit code and a one-paragraph message on stderr."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CompilerError as err:
            err_console.print(
                f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True
            )
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]


def _settings() -> Any:
    from pydantic import ValidationError

    from compiler.settings import CompilerSettings

    try:
        return CompilerSettings()
    except ValidationError as err:
        problems = "; ".join(
            f"EDGELOOP_{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}"
            for e in err.errors()
        )
        raise UsageError(f"invalid setting: {problems}") from err


def _registry(settings: Any) -> Any:
    from compiler.profiles import ProfileRegistry

    return ProfileRegistry(settings.profile_roots())


# ------------------------------------------------------------------ profiles


@click.group("profiles")
def profiles_group() -> None:
    """List, show and validate hardware profiles."""


@profiles_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@handle_errors
def profiles_list(as_json: bool) -> None:
    """List the known hardware profiles."""
    profiles = _registry(_settings()).all()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": p.name,
                        "isa": p.isa,
                        "description": p.description,
                        "runtimes": p.runtimes,
                    }
                    for p in profiles
                ],
                indent=2,
            )
        )
        return
    table = Table("name", "isa", "accelerator", "runtimes", "description")
    for p in profiles:
        acc = f"{p.accelerator.kind} {p.accelerator.arch}" if p.accelerator else "-"
        table.add_row(p.name, p.isa, acc, ", ".join(p.runtimes), p.description)
    out_console.print(table)


@profiles_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@handle_errors
def profiles_show(name: str, as_json: bool) -> None:
    """Show one profile, fully resolved."""
    profile = _registry(_settings()).get(name)
    data = profile.model_dump(mode="json")
    click.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False))


@profiles_group.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@handle_errors
def profiles_validate(paths: tuple[Path, ...]) -> None:
    """Validate profile files; exit 3 if any is invalid."""
    from compiler.errors import ProfileError
    from compiler.profiles import load_profile_file

    failures = 0
    for path in paths:
        try:
            profile = load_profile_file(path)
        except ProfileError as err:
            failures += 1
            err_console.print(f"[red]invalid[/] {err}", highlight=False)
        else:
            out_console.print(f"[green]ok[/] {path} ({profile.name})", highlight=False)
    if failures:
        raise ProfileError(f"{failures} of {len(paths)} profile file(s) are invalid")


# ------------------------------------------------------------------ keys


@click.group("keys")
def keys_group() -> None:
    """Manage the ed25519 key that signs artifacts."""


@keys_group.command("generate")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for signing-key.pem/.pub (default: $EDGELOOP_CONFIG_DIR/keys, "
    "i.e. ~/.config/edgeloop/keys).",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@handle_errors
def keys_generate(output_dir: Path | None, force: bool) -> None:
    """Generate a signing key pair."""
    from compiler.signing import generate_keys, key_id, load_public_key

    paths = generate_keys(output_dir or _settings().keys_dir, overwrite=force)
    kid = key_id(load_public_key(paths.public))
    out_console.print(
        f"private key: {paths.private}\npublic key:  {paths.public}\nkey id:      {kid}",
        highlight=False,
    )


# ------------------------------------------------------------------ compile


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--profile", "profile", required=True, help="Hardware profile name (see 'profiles list')."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Artifact bundle directory to create.",
)
@click.option(
    "--trials",
    type=int,
    default=None,
    help="MetaSchedule trials (default: the profile's default_trials; 0 = no tuning).",
)
@click.option(
    "--tuning-db",
    type=click.Path(path_type=Path),
    default=None,
    help="Persistent tuning database directory (default: $EDGELOOP_CACHE_DIR/tuning).",
)
@click.option(
    "--retune",
    is_flag=True,
    help="Continue an earlier tuning: share --trials over every task of the model, those "
    "with records in the tuning database too (without it, recorded tasks are reused as they "
    "are and a fully recorded model tunes nothing).",
)
@click.option(
    "--weight-prepack/--no-weight-prepack",
    default=None,
    help="Let tuning choose the weights' memory layout, rewritten once at build time (CPU "
    "profiles built natively; --weight-prepack needs --trials > 0). Default: on when tuning, "
    "or when the tuning database covers every task of a prepacked build.",
)
@click.option(
    "--fuse-blocks/--no-fuse-blocks",
    default=None,
    help="Compute MobileNetV2-style inverted-residual blocks (1x1, 3x3 depthwise of "
    "stride 1 or 2, 1x1) as one hand-scheduled kernel each, and 3x3 (Winograd where it "
    "pays), first-layer, stride-2 and small-map 1x1 convolutions and max pools as "
    "hand-scheduled kernels, untuned. "
    "Default: on for x86-64 profiles with AVX-512 or AVX2 + FMA (accumulator blocks sized "
    "for each), by request on ARM.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: 1x1 convolutions on small maps and the fused blocks' expansions and "
    "projections with bf16 products and fp32 sums (x86-64 profiles with avx512_bf16; the 1x1 "
    "convolutions on AMX tiles where the profile lists amx_tile and amx_bf16; gated by the "
    "profile's accuracy_bf16 tolerances).",
)
@click.option(
    "--runtime",
    type=str,
    default="auto",
    show_default=True,
    help="auto | tvm | onnxruntime; auto ships the faster measured runtime.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:1x3x224x224",
    help="Static shape of a model input (repeatable).",
)
@click.option(
    "--calibration-data",
    type=click.Path(path_type=Path),
    default=None,
    help=".npz with one array per input (samples on axis 0) for the accuracy gate.",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path),
    default=None,
    help="NPU profiles: .npz like --calibration-data (optional labels) to measure int8 "
    "accuracy on; default: the last 25 % of the calibration samples, held out.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="Accuracy-gate samples (default: the profile's).",
)
@click.option("--name", "model_name", default=None, help="Model name (default: file stem).")
@click.option("--version", "model_version", default="1", show_default=True, help="Model version.")
@click.option(
    "--signing-key",
    type=click.Path(path_type=Path),
    default=None,
    help="ed25519 private key (default: the key made by 'keys generate').",
)
@click.option("--force", is_flag=True, help="Replace an existing output bundle.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest and report as JSON on stdout."
)
@handle_errors
def compile_command(
    model: Path,
    profile: str,
    output: Path,
    trials: int | None,
    tuning_db: Path | None,
    retune: bool,
    weight_prepack: bool | None,
    fuse_blocks: bool | None,
    precision: str,
    runtime: str,
    input_shapes: tuple[str, ...],
    calibration_data: Path | None,
    eval_data: Path | None,
    samples: int | None,
    model_name: str | None,
    model_version: str,
    signing_key: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Compile MODEL (.onnx, .pt2, .tflite) for a hardware profile into a signed artifact."""
    from compiler.pipeline import CompileRequest, compile_model
    from compiler.shapes import parse_input_shapes

    request = CompileRequest(
        model=model,
        profile=profile,
        output=output,
        model_name=model_name,
        model_version=model_version,
        trials=trials,
        tuning_db=tuning_db,
        retune=retune,
        weight_prepack=weight_prepack,
        fuse_blocks=fuse_blocks,
        precision=precision,
        runtime=runtime,
        input_shapes=parse_input_shapes(input_shapes),
        calibration_data=calibration_data,
        eval_data=eval_data,
        samples=samples,
        signing_key=signing_key,
        force=force,
    )
    with _Progress() as progress:
        result = compile_model(
            request, settings=_settings(), tuning_progress=progress.tuning, step=progress.step
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "artifact_id": result.artifact_id,
                    "manifest": result.manifest.model_dump(mode="json"),
                    "report": result.report,
                },
                indent=2,
            )
        )
    else:
        print_report(
            result.output,
            result.artifact_id,
            result.manifest.model_dump(mode="json"),
            result.report,
        )


class _Progress:
    """Step messages on stderr and a rich progress bar for tuning when stderr is a terminal."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self._bar: Progress | None = (
            Progress(console=err_console, transient=True) if err_console.is_terminal else None
        )
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def step(self, message: str) -> None:
        err_console.print(f"[dim]·[/] {message}", highlight=False)

    def tuning(self, done: int, total: int) -> None:
        if self._bar is None:
            if done == 0 or done == total:
                err_console.print(f"[dim]·[/] tuning trials: {done}/{total}", highlight=False)
            return
        if self._task is None:
            self._task = self._bar.add_task("tuning", total=total)
        self._bar.update(self._task, completed=done, total=total)


def print_report(
    path: Path, artifact_id: str, manifest: dict[str, Any], report: dict[str, Any]
) -> None:
    """Human summary of an artifact (used by compile and artifact inspect)."""
    table = Table(show_header=False, box=None)
    table.add_row("artifact", str(path))
    table.add_row("artifact id", artifact_id)
    table.add_row("model", f"{manifest['model']['name']} v{manifest['model']['version']}")
    table.add_row("profile", f"{manifest['profile']} ({manifest['isa']})")
    table.add_row("runtime", f"{manifest['runtime']}: {manifest['runtime_reason']}")
    precision = report.get("precision", "fp32")
    if precision != "fp32":
        kernels = [
            b for b in (report.get("tuning") or {}).get("fused_blocks", []) if precision in b
        ]
        table.add_row(
            "precision",
            f"{precision} products in {len(kernels)} kernel(s) of the TVM library (1x1 "
            "convolutions, block projections), fp32 elsewhere"
            if manifest["runtime"] == "tvm"
            else f"fp32: {manifest['runtime']} shipped, the {precision} TVM build was not",
        )
    ver = report.get("verification", {})
    table.add_row(
        "verified",
        f"yes, {ver.get('where')} ({ver.get('samples')} samples)"
        if ver.get("executed")
        else f"NO: {ver.get('reason')}",
    )
    for name, acc in (report.get("accuracy") or {}).items():
        top1 = acc.get("top1_agreement")
        table.add_row(
            f"accuracy {name}",
            f"max abs {acc['max_abs_error']:.2e}, rel {acc['max_rel_error']:.2e}, "
            f"cos {acc['cosine']:.6f}" + (f", top-1 {top1:.3f}" if top1 is not None else ""),
        )
    for runtime, lat in (report.get("latency") or {}).items():
        note = " (emulated, not representative)" if lat.get("emulated") else ""
        if lat.get("threads"):
            note = f", {lat['threads']} thread(s)" + note
        table.add_row(
            f"latency {runtime}",
            f"median {lat.get('median_ms')} ms, p95 {lat.get('p95_ms')} ms{note}",
        )
    tuning = report.get("tuning")
    if tuning:
        table.add_row(
            "tuning",
            f"{tuning['tasks_total']} tasks, {tuning['tasks_reused']} reused, "
            f"{tuning['new_trials']} new trials, {tuning['records_applied']} records applied",
        )
    _npu_rows(table, report.get("npu"))
    out_console.print(table)


def _npu_rows(table: Table, npu: dict[str, Any] | None) -> None:
    """Rows of an NPU compile: offload share, vendor estimate, int8 accuracy, CPU fallbacks."""
    if not npu:
        return
    off, est, acc = npu["offload"], npu["estimate"], npu["int8_accuracy"]
    table.add_row(
        "npu offload",
        f"{off['operators_npu']}/{off['operators_total']} operators "
        f"({off['operator_share_npu']:.0%}), {off['macs_npu']}/{off['macs_total']} MACs "
        f"({off['mac_share_npu']:.1%}) on {npu['accelerator']}",
    )
    table.add_row(
        "npu estimate",
        f"vela {npu['vela_version']}: {est['cycles_total']} cycles, "
        f"{est['inference_time_ms']} ms at {est['clock_mhz']} MHz, "
        f"SRAM {est['sram_used_kib']} KiB, DRAM {est['dram_used_kib']} KiB",
    )
    top1 = acc.get("top1_agreement")
    labels = acc.get("labels")
    table.add_row(
        "int8 vs fp32",
        (
            f"top-1 agreement {top1:.3f} (min {acc['min_top1_agreement']})"
            if top1 is not None
            else "-"
        )
        + (
            f", accuracy int8 {labels['int8_accuracy']:.3f} / fp32 {labels['fp32_accuracy']:.3f}"
            f" on {labels['samples']} labelled samples"
            if labels
            else ""
        ),
    )
    measured = acc.get("measured_on")  # absent in reports written before --eval-data
    if measured:
        table.add_row("int8 measured on", measured["description"])
    for op in off["cpu_operators"]:
        table.add_row("cpu fallback", f"{op['op']} ({op['output']}): {op['reason']}")


# ------------------------------------------------------------------ artifact


@click.group("artifact")
def artifact_group() -> None:
    """Inspect and verify artifact bundles."""


def _public_key(settings: Any, path: Path | None) -> Any:
    from compiler.signing import KeyPaths, load_public_key

    return load_public_key(path or KeyPaths.in_dir(settings.keys_dir).public)


@artifact_group.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Manifest and report as JSON on stdout.")
@handle_errors
def artifact_inspect(path: Path, as_json: bool) -> None:
    """Show an artifact's manifest and report (does not verify; see 'artifact verify')."""
    from compiler.bundle import read_manifest
    from compiler.manifest import REPORT_FILE, artifact_id_of

    manifest, data = read_manifest(path)
    try:
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = {}
    if as_json:
        click.echo(
            json.dumps(
                {
                    "artifact_id": artifact_id_of(data),
                    "manifest": manifest.model_dump(mode="json"),
                    "report": report,
                },
                indent=2,
            )
        )
        return
    print_report(path, artifact_id_of(data), manifest.model_dump(mode="json"), report)


@artifact_group.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    type=click.Path(path_type=Path),
    default=None,
    help="ed25519 public key PEM (default: the default key's public half).",
)
@handle_errors
def artifact_verify(path: Path, public_key: Path | None) -> None:
    """Verify an artifact's signature and every file hash; exit 3 if anything is off."""
    from compiler.bundle import verify_bundle

    verified = verify_bundle(path, _public_key(_settings(), public_key))
    out_console.print(
        f"[green]verified[/] {path}: artifact {verified.artifact_id} "
        f"({len(verified.manifest.files)} files, key {verified.manifest.signing_key_id})",
        highlight=False,
    )


def register(group: click.Group) -> None:
    """Add the compiler's commands to the root CLI."""
    group.add_command(profiles_group)
    group.add_command(keys_group)
    group.add_command(compile_command)
    group.add_command(artifact_group)


__all__ = ["register", "handle_errors", "UsageError"]

"""Arm Vela (``ethos-u-vela``): compile an int8 .tflite for an Ethos-U NPU and read its estimate.

Vela partitions by itself: operators its supported-operator check accepts become one or more
``ethos-u`` custom operators (the NPU command stream and its weights), the rest stay TFLite
builtins for the host CPU. It writes ``<name>_vela.tflite`` and ``<name>_summary_<system
config>.csv`` (cycles, memory, inference time at the system config's clock), and prints
per-operator warnings with the reason for each CPU fallback.

The run is a subprocess (``python -m ethosu.vela``), injected as ``runner`` so tests can
swap it; the parsers below are pure.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import BuildFailedError, MissingDependencyError

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
_WARNING = re.compile(
    r"Warning \(supported operators\) operator: (?P<op>\S+), ofm: '(?P<ofm>[^']*)'\n"
    r"Reason: (?P<reason>[^\n]*(?:\n(?!\n|Warning)[^\n]*)*)"
)


@dataclass(frozen=True)
class VelaConfig:
    """The vela options a profile names."""

    accelerator_config: str
    system_config: str
    memory_mode: str
    config_file: Path | None = None
    ignore_ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class VelaResult:
    """What one vela run produced."""

    optimized_tflite: bytes
    summary: dict[str, str]
    cpu_reasons: dict[str, str]  # ofm tensor name -> why vela kept that operator on the CPU
    log: str
    version: str | None


def _default_runner(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ethosu.vela", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def vela_version() -> str | None:
    """The installed ethos-u-vela version, or None."""
    from importlib import metadata

    try:
        return metadata.version("ethos-u-vela")
    except metadata.PackageNotFoundError:
        return None


def default_config_file() -> Path:
    """vela's bundled Arm/vela.ini (system configs and memory modes of Arm's reference designs)."""
    import importlib.util

    spec = importlib.util.find_spec("ethosu")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("ethos-u-vela", "npu")
    return Path(next(iter(spec.submodule_search_locations))) / "config_files" / "Arm" / "vela.ini"


def compile_tflite(
    tflite_bytes: bytes,
    config: VelaConfig,
    *,
    workdir: Path,
    name: str = "model",
    runner: Runner | None = None,
) -> VelaResult:
    """Run vela on an int8 model.

    Raises:
        MissingDependencyError: ethos-u-vela is not installed.
        BuildFailedError: vela failed; the message carries its output.
    """
    version = vela_version()
    if runner is None and version is None:
        raise MissingDependencyError("ethos-u-vela", "npu")
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"{name}.tflite"
    source.write_bytes(tflite_bytes)
    out_dir = workdir / "vela"
    config_file = config.config_file or default_config_file()
    args = [
        str(source),
        "--config",
        str(config_file),
        "--accelerator-config",
        config.accelerator_config,
        "--system-config",
        config.system_config,
        "--memory-mode",
        config.memory_mode,
        "--output-dir",
        str(out_dir),
        "--show-cpu-operations",
    ]
    if config.ignore_ops:
        args += ["--ignore-ops", ",".join(config.ignore_ops)]
    proc = (runner or _default_runner)(args)
    log = (proc.stdout or "") + (proc.stderr or "")
    optimized = out_dir / f"{name}_vela.tflite"
    summaries = sorted(out_dir.glob(f"{name}_summary_*.csv")) if out_dir.is_dir() else []
    if proc.returncode != 0 or not optimized.is_file() or not summaries:
        raise BuildFailedError(
            f"vela failed for {config.accelerator_config} ({config.system_config}, "
            f"{config.memory_mode}), exit {proc.returncode}:\n{log.strip()[-4000:]}"
        )
    return VelaResult(
        optimized_tflite=optimized.read_bytes(),
        summary=parse_summary_csv(summaries[0].read_text(encoding="utf-8")),
        cpu_reasons=parse_cpu_reasons(log),
        log=log,
        version=version,
    )


def parse_summary_csv(text: str) -> dict[str, str]:
    """The one data row of vela's summary CSV as a column -> value dict.

    Raises:
        BuildFailedError: not a one-row CSV with a header.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    if len(rows) != 1:
        raise BuildFailedError(f"vela's summary CSV has {len(rows)} data rows; expected 1")
    return {k: v for k, v in rows[0].items() if k is not None}


def parse_cpu_reasons(log: str) -> dict[str, str]:
    """Map each CPU-fallback operator's output tensor to vela's stated reason."""
    return {
        m["ofm"]: " ".join(line.strip() for line in m["reason"].splitlines() if line.strip())
        for m in _WARNING.finditer(log)
    }


def estimate(summary: dict[str, str]) -> dict[str, Any]:
    """Vela's performance estimate as numbers (cycles, time at the NPU clock, memory).

    Raises:
        BuildFailedError: a column the report needs is missing or not a number.
    """

    def num(key: str) -> float:
        try:
            return float(summary[key])
        except (KeyError, ValueError) as err:
            raise BuildFailedError(
                f"vela's summary lacks a numeric {key!r} (got {summary.get(key)!r})"
            ) from err

    clock_hz = num("core_clock")
    cycles_total = int(num("cycles_total"))
    return {
        "accelerator": summary.get("accelerator_configuration"),
        "system_config": summary.get("system_config"),
        "memory_mode": summary.get("memory_mode"),
        "clock_mhz": round(clock_hz / 1e6, 3),
        "cycles_total": cycles_total,
        "cycles_npu": int(num("cycles_npu")),
        "cycles_sram_access": int(num("cycles_sram_access")),
        "cycles_dram_access": int(num("cycles_dram_access")),
        "inference_time_ms": round(num("inference_time") * 1000.0, 6),
        "inferences_per_second": round(num("inferences_per_second"), 1),
        "sram_used_kib": round(num("sram_memory_used"), 3),
        "dram_used_kib": round(num("dram_memory_used"), 3),
        "weights_original_bytes": int(num("total_original_weights")),
        "weights_npu_encoded_bytes": int(num("total_npu_encoded_weights")),
        "npu_macs": int(num("nn_macs")),
    }

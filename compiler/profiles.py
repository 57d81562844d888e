"""Hardware profiles: the schema, loading and validation of ``hw-profiles/<vendor>/<board>.yaml``.

A profile is data. Its ``tvm`` block is a TVM target dict passed unchanged to
``tvm.target.Target(dict)`` (TVM's own key spelling: ``mtriple``, ``mattr``, ``num-cores``,
``host``); our own keys are snake_case with units in the name. Pure module: no TVM import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compiler.errors import ProfileError, UsageError

SCHEMA_VERSION = 1
Isa = Literal["x86_64", "aarch64", "armv7"]
# "ethos-u": a Vela-compiled .tflite run by LiteRT with the Ethos-U delegate (compiler.npu).
RuntimeName = Literal["tvm", "onnxruntime", "tflite", "ethos-u"]
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9._-]*$")
_TVM_KINDS = ("llvm", "cuda", "c")
# LLVM triples per ISA: the compiler refuses a profile whose target disagrees with its isa.
_TRIPLE_PREFIX: dict[str, tuple[str, ...]] = {
    "x86_64": ("x86_64",),
    "aarch64": ("aarch64",),
    "armv7": ("armv7", "thumbv7"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NpuCompilerSpec(_Strict):
    """How an NPU profile's model is quantized and compiled (``accelerator.npu``).

    ``compiler: vela`` runs Arm Vela with ``--accelerator-config``, ``--system-config`` and
    ``--memory-mode`` (sections of ``config_file``, default vela's bundled Arm/vela.ini).
    ``supported_operators`` (TFLite builtin names) narrows what may run on the NPU; null
    defers to the vendor compiler's own supported-operator check.
    """

    compiler: Literal["vela"]
    accelerator_config: str = Field(description="vela --accelerator-config, e.g. ethos-u65-256")
    system_config: str = Field(description="vela --system-config, e.g. Ethos_U65_High_End")
    memory_mode: str = Field(description="vela --memory-mode, e.g. Dedicated_Sram_384KB")
    config_file: str | None = None
    supported_operators: list[str] | None = None
    calibration_samples: int = Field(default=64, ge=1, le=4096)
    min_int8_top1_agreement: float = Field(default=0.9, ge=0, le=1)


class AcceleratorSpec(_Strict):
    """A GPU or NPU beside the host CPU."""

    kind: Literal["cuda", "npu"]
    arch: str = Field(description="e.g. sm_87 for CUDA, ethos-u65-256 for an NPU")
    memory_mib: int | None = Field(default=None, gt=0)
    npu: NpuCompilerSpec | None = None

    @model_validator(mode="after")
    def _npu_block(self) -> AcceleratorSpec:
        if (self.kind == "npu") != (self.npu is not None):
            raise ValueError("accelerator.kind 'npu' needs an npu block, and only it may have one")
        return self


class AccuracySpec(_Strict):
    """Tolerances of the accuracy gate against the reference runtime (ONNX Runtime)."""

    max_abs_error: float = Field(default=1e-4, gt=0)
    max_rel_error: float = Field(default=1e-3, gt=0)
    min_cosine: float = Field(default=0.9999, gt=0, le=1)
    min_top1_agreement: float = Field(default=1.0, ge=0, le=1)
    samples: int = Field(default=8, ge=1, le=1024)


class TuningSpec(_Strict):
    """Default MetaSchedule budget for this profile."""

    default_trials: int = Field(default=0, ge=0)
    max_trials_per_task: int = Field(default=64, ge=1)


class ResourcesSpec(_Strict):
    """What the board offers; the compiler warns when an artifact would not fit."""

    cpu_cores: int = Field(gt=0)
    memory_mib: int = Field(gt=0)
    storage_mib: int = Field(gt=0)


class HardwareProfile(_Strict):
    """One hardware profile (schema version 1)."""

    schema_version: Literal[1]
    name: str
    description: str
    isa: Isa
    cpu_features: list[str] = Field(
        default_factory=list,
        description="CPU features the compiled code needs (checked before native execution)",
    )
    tvm: dict[str, Any] = Field(description="TVM target dict, passed to tvm.target.Target")
    cross_compiler: str | None = None
    runtimes: list[RuntimeName] = Field(min_length=1)
    accelerator: AcceleratorSpec | None = None
    accuracy: AccuracySpec = AccuracySpec()
    # The gate for ``--precision bf16`` builds (bf16 products: ~3 significant digits per
    # layer); None: the profile builds fp32 only.
    accuracy_bf16: AccuracySpec | None = None
    tuning: TuningSpec = TuningSpec()
    resources: ResourcesSpec

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"profile name {value!r} must look like 'vendor/board' "
                "(lower case letters, digits, '-', '.', '_')"
            )
        return value

    @field_validator("tvm")
    @classmethod
    def _tvm_target(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_target_dict(value, where="tvm")
        if "host" in value:
            if not isinstance(value["host"], dict):
                raise ValueError("tvm.host must be a target dict such as {kind: llvm, ...}")
            _check_target_dict(value["host"], where="tvm.host")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        cpu = host_target(self)
        triple = cpu.get("mtriple")
        if triple is not None and not str(triple).startswith(_TRIPLE_PREFIX[self.isa]):
            raise ValueError(
                f"tvm mtriple {triple!r} does not match isa {self.isa!r}; "
                f"expected a triple starting with {' or '.join(_TRIPLE_PREFIX[self.isa])}"
            )
        is_cuda = self.tvm["kind"] == "cuda"
        if is_cuda != (self.accelerator is not None and self.accelerator.kind == "cuda"):
            raise ValueError("a cuda tvm target needs accelerator.kind 'cuda', and vice versa")
        if (
            is_cuda
            and self.accelerator is not None
            and self.tvm.get("arch") != self.accelerator.arch
        ):
            raise ValueError(
                f"tvm.arch {self.tvm.get('arch')!r} differs from accelerator.arch "
                f"{self.accelerator.arch!r}"
            )
        return self

    @property
    def npu(self) -> NpuCompilerSpec | None:
        """The NPU compile settings, when the profile's accelerator is an NPU."""
        return self.accelerator.npu if self.accelerator is not None else None

    @property
    def has_gpu(self) -> bool:
        """Whether the profile's main target is a CUDA GPU."""
        return bool(self.tvm["kind"] == "cuda")


def _check_target_dict(value: dict[str, Any], *, where: str) -> None:
    kind = value.get("kind")
    if kind not in _TVM_KINDS:
        raise ValueError(f"{where}.kind is {kind!r}; choose from: {', '.join(_TVM_KINDS)}")
    if value.get("mcpu") == "native":
        # The bundled LLVM rejects 'native' and silently falls back to generic code.
        raise ValueError(f"{where}.mcpu 'native' is not allowed; name a real CPU (e.g. skylake)")
    if kind == "llvm" and "mtriple" not in value:
        raise ValueError(f"{where} needs an mtriple (e.g. aarch64-linux-gnu)")


def host_target(profile: HardwareProfile) -> dict[str, Any]:
    """Return the CPU part of the profile's target: ``tvm.host`` for GPUs, else ``tvm``."""
    host = profile.tvm.get("host")
    return dict(host) if isinstance(host, dict) else dict(profile.tvm)


def parse_profile(data: Any, *, source: str = "<inline>") -> HardwareProfile:
    """Validate already-parsed YAML/JSON data as a profile.

    Raises:
        ProfileError: the data does not match the schema; the message names each bad field.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a mapping, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{source}: schema_version {version!r} is not supported; this edgeloop reads "
            f"schema_version {SCHEMA_VERSION}"
        )
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ProfileError(f"{source}: invalid profile: {problems}") from err


def load_profile_file(path: Path, *, root: Path | None = None) -> HardwareProfile:
    """Load and validate one profile file.

    When ``root`` is given, the profile's ``name`` must equal its path below ``root``
    without the ``.yaml`` suffix, so that names and files cannot drift apart.

    Raises:
        ProfileError: unreadable file, bad YAML, or a schema violation.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ProfileError(f"cannot read profile file {str(path)!r}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from err
    profile = parse_profile(data, source=str(path))
    if root is not None:
        expected = path.relative_to(root).with_suffix("").as_posix()
        if profile.name != expected:
            raise ProfileError(
                f"{path}: name {profile.name!r} does not match its location; expected {expected!r}"
            )
    return profile


def _iter_profile_files(root: Path) -> Iterator[Path]:
    yield from sorted(p for p in root.rglob("*.yaml") if p.is_file())


class ProfileRegistry:
    """The profiles found in one or more directories (later directories override earlier)."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self._files: dict[str, tuple[Path, Path]] = {}
        for root in roots:
            if root.is_dir():
                for path in _iter_profile_files(root):
                    name = path.relative_to(root).with_suffix("").as_posix()
                    self._files[name] = (path, root)

    def names(self) -> list[str]:
        """Sorted names of every profile known."""
        return sorted(self._files)

    def _entry(self, name: str) -> tuple[Path, Path]:
        try:
            return self._files[name]
        except KeyError:
            raise UsageError(
                f"unknown hardware profile {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def path(self, name: str) -> Path:
        """Return the file of a profile name, or raise UsageError listing the valid names."""
        return self._entry(name)[0]

    def get(self, name: str) -> HardwareProfile:
        """Load a profile by name.

        Raises:
            UsageError: no such profile (the message lists the valid names).
            ProfileError: the file exists but does not validate.
        """
        path, root = self._entry(name)
        return load_profile_file(path, root=root)

    def all(self) -> list[HardwareProfile]:
        """Load every profile (raises on the first invalid one)."""
        return [self.get(name) for name in self.names()]

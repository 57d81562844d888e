"""Hardware profiles: every shipped file validates; bad ones fail with named fields."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from compiler.errors import ProfileError, UsageError
from compiler.profiles import ProfileRegistry, host_target, load_profile_file, parse_profile
from compiler.settings import CompilerSettings
from edgeloop.cli import cli

ROOT = Path(__file__).resolve().parents[2] / "hw-profiles"
SHIPPED = sorted(p.relative_to(ROOT).with_suffix("").as_posix() for p in ROOT.rglob("*.yaml"))
REQUIRED = {
    "generic/x86_64",
    "intel/x86_64-avx512",
    "raspberry-pi/4b-aarch64",
    "raspberry-pi/5-aarch64",
    "raspberry-pi/3b-armv7",
    "nvidia/jetson-orin-nano",
    "nvidia/h100",
}


def test_required_profiles_are_shipped() -> None:
    assert REQUIRED <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_validates_and_tvm_accepts_its_target(name: str) -> None:
    import tvm

    profile = load_profile_file(ROOT / f"{name}.yaml", root=ROOT)
    assert profile.name == name
    target = tvm.target.Target(profile.tvm)
    assert target.kind.name == profile.tvm["kind"]
    if profile.cross_compiler:
        assert profile.isa != "x86_64"


def _base() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "raspberry-pi/4b-aarch64.yaml").read_text())


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_base())
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema_version", 2, "schema_version 2 is not supported"),
        ("surprise", 1, "surprise: Extra inputs are not permitted"),
        ("name", "Raspberry Pi", "must look like 'vendor/board'"),
        ("isa", "riscv64", "isa: Input should be"),
        ("tvm.kind", "vulkan", "choose from: llvm, cuda, c"),
        ("tvm.mcpu", "native", "'native' is not allowed"),
        ("tvm.mtriple", "x86_64-linux-gnu", "does not match isa 'aarch64'"),
        ("tvm.mtriple", _DELETE, "needs an mtriple"),
        ("runtimes", [], "runtimes: List should have at least 1 item"),
        ("runtimes", ["tensorrt"], "runtimes.0: Input should be"),
        (
            "accuracy.min_cosine",
            1.5,
            "accuracy.min_cosine: Input should be less than or equal to 1",
        ),
        ("resources.memory_mib", 0, "resources.memory_mib: Input should be greater than 0"),
        ("accelerator", {"kind": "cuda", "arch": "sm_87"}, "cuda tvm target needs accelerator"),
    ],
)
def test_invalid_profile_names_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profile(_with(path, value), source="test.yaml")


def test_cuda_profile_arch_must_match_accelerator() -> None:
    data = yaml.safe_load((ROOT / "nvidia/h100.yaml").read_text())
    data["accelerator"]["arch"] = "sm_80"
    with pytest.raises(ProfileError, match="differs from accelerator.arch"):
        parse_profile(data)
    assert (
        host_target(parse_profile(yaml.safe_load((ROOT / "nvidia/h100.yaml").read_text())))["kind"]
        == "llvm"
    )


def test_name_must_match_location(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    path = tmp_path / "acme" / "board.yaml"
    path.write_text(yaml.safe_dump(_base()))
    with pytest.raises(ProfileError, match="expected 'acme/board'"):
        load_profile_file(path, root=tmp_path)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile_file(bad)
    with pytest.raises(ProfileError, match="cannot read profile file"):
        load_profile_file(tmp_path / "missing.yaml")


def test_unknown_profile_lists_choices() -> None:
    registry = ProfileRegistry([ROOT])
    with pytest.raises(UsageError) as info:
        registry.get("rpi4")
    assert "unknown hardware profile 'rpi4'" in str(info.value)
    assert "raspberry-pi/4b-aarch64" in str(info.value)


def test_user_profiles_dir_adds_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _with("description", "my own Pi 4")
    (tmp_path / "raspberry-pi").mkdir()
    (tmp_path / "raspberry-pi" / "4b-aarch64.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGELOOP_PROFILES_DIR", str(tmp_path))
    registry = ProfileRegistry(CompilerSettings().profile_roots())
    assert registry.get("raspberry-pi/4b-aarch64").description == "my own Pi 4"
    assert "generic/x86_64" in registry.names()


def test_cli_list_show_validate(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["profiles", "list", "--json"])
    assert listed.exit_code == 0
    assert {p["name"] for p in __import__("json").loads(listed.stdout)} >= REQUIRED
    shown = runner.invoke(cli, ["profiles", "show", "nvidia/jetson-orin-nano"])
    assert shown.exit_code == 0 and "sm_87" in shown.output
    unknown = runner.invoke(cli, ["profiles", "show", "rpi4"])
    assert unknown.exit_code == 2
    assert "choose from" in unknown.stderr and "generic/x86_64" in unknown.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("tvm.mcpu", "native")))
    good = ROOT / "generic" / "x86_64.yaml"
    result = runner.invoke(cli, ["profiles", "validate", str(good), str(bad)])
    assert result.exit_code == 3
    assert "'native' is not allowed" in result.stderr
    assert "1 of 2 profile file(s) are invalid" in result.stderr
    assert runner.invoke(cli, ["profiles", "validate", str(good)]).exit_code == 0

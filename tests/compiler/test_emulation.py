"""Tests of compiler.emulation: pure tables first, then one real run under qemu-aarch64."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from compiler import emulation
from compiler.emulation import (
    EmulationError,
    QemuNotFoundError,
    UnknownArchError,
    canonical_arch,
    default_cache_dir,
    emulated_python_command,
    ensure_sysroot,
    find_sysroot,
    qemu_binary,
    qemu_binary_name,
    recipe_digest,
    sysroot_spec,
)

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "compiler" / "runner_main.py"


@pytest.fixture(autouse=True)
def _clean_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unit tests see no cache setting of the host; the qemu test keeps the real cache."""
    if request.node.get_closest_marker("qemu") is None:
        monkeypatch.delenv("EDGELOOP_CACHE_DIR", raising=False)
    yield


def _fake_qemu_dir(tmp_path: Path, *names: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in names:
        exe = bindir / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bindir


def _fake_sysroot(cache: Path, *, stamp: str | None, python: bool = True) -> Path:
    root = cache / "sysroots" / "aarch64"
    (root / "usr" / "bin").mkdir(parents=True)
    if python:
        (root / "usr" / "bin" / "python3.11").write_bytes(b"\x7fELF")
    if stamp is not None:
        (root / emulation.STAMP_NAME).write_text(stamp)
    return root


def _good_stamp(script: Path = emulation.BUILD_SCRIPT) -> str:
    return f"format=2\narch=aarch64\nrecipe_sha256={recipe_digest(script)}\nwheel:numpy==2.4.6\n"


# ---- architecture table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "canonical", "qemu"),
    [
        ("aarch64", "aarch64", "qemu-aarch64-static"),
        ("arm64", "aarch64", "qemu-aarch64-static"),
        ("armv7", "armv7", "qemu-arm-static"),
        ("armv7l", "armv7", "qemu-arm-static"),
        ("armhf", "armv7", "qemu-arm-static"),
        ("arm", "armv7", "qemu-arm-static"),
    ],
)
def test_arch_table(arch: str, canonical: str, qemu: str) -> None:
    assert canonical_arch(arch) == canonical
    assert qemu_binary_name(arch) == qemu


@pytest.mark.parametrize("arch", ["x86_64", "riscv64", "AARCH64", "", "aarch64 "])
def test_unknown_arch_names_the_value_and_the_choices(arch: str) -> None:
    with pytest.raises(UnknownArchError) as info:
        qemu_binary_name(arch)
    assert repr(arch) in str(info.value)
    assert "choose from: aarch64, arm, arm64, armhf, armv7, armv7l" in str(info.value)
    assert info.value.exit_code == 2
    assert isinstance(info.value, EmulationError)


# ---- qemu lookup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "binary"), [("aarch64", "qemu-aarch64-static"), ("armv7", "qemu-arm-static")]
)
def test_qemu_binary_found_on_search_path(tmp_path: Path, arch: str, binary: str) -> None:
    bindir = _fake_qemu_dir(tmp_path, binary)
    assert qemu_binary(arch, search_path=str(bindir)) == bindir / binary


@pytest.mark.parametrize(
    ("arch", "binary"), [("aarch64", "qemu-aarch64-static"), ("arm", "qemu-arm-static")]
)
def test_missing_qemu_names_binary_and_debian_package(
    tmp_path: Path, arch: str, binary: str
) -> None:
    with pytest.raises(QemuNotFoundError) as info:
        qemu_binary(arch, search_path=str(tmp_path))
    assert binary in str(info.value)
    assert "qemu-user-static" in str(info.value)
    assert info.value.exit_code == 5


# ---- cache location --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EDGELOOP_CACHE_DIR": "/var/cache/el"}, Path("/var/cache/el")),
        ({"EDGELOOP_CACHE_DIR": ""}, Path.home() / ".cache" / "edgeloop"),
        ({}, Path.home() / ".cache" / "edgeloop"),
    ],
)
def test_default_cache_dir(env: dict[str, str], expected: Path) -> None:
    assert default_cache_dir(env) == expected


def test_default_cache_dir_reads_environment_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELOOP_CACHE_DIR", str(tmp_path))
    assert sysroot_spec("arm64").root == tmp_path / "sysroots" / "aarch64"


@pytest.mark.parametrize(
    ("arch", "cache", "root"),
    [
        ("aarch64", "/c", "/c/sysroots/aarch64"),
        ("arm64", "/c", "/c/sysroots/aarch64"),
        ("armhf", "/c", "/c/sysroots/armv7"),
    ],
)
def test_sysroot_spec_layout(arch: str, cache: str, root: str) -> None:
    spec = sysroot_spec(arch, Path(cache))
    assert spec.root == Path(root)
    assert spec.python == Path(root) / "usr/bin/python3.11"
    assert spec.site == Path(root) / "site"


# ---- finding a ready sysroot -----------------------------------------------------------------


def test_find_sysroot_accepts_a_stamped_sysroot(tmp_path: Path) -> None:
    root = _fake_sysroot(tmp_path, stamp=_good_stamp())
    assert find_sysroot("aarch64", tmp_path) == root
    assert find_sysroot("arm64", tmp_path) == root


@pytest.mark.parametrize(
    ("stamp", "python"),
    [
        (None, True),  # never finished: no stamp
        ("format=3\narch=aarch64\nrecipe_sha256={digest}\n", True),
        ("format=1\narch=aarch64\nrecipe_sha256={digest}\n", True),  # no agent deps yet
        ("format=2\narch=armv7\nrecipe_sha256={digest}\n", True),
        ("format=2\narch=aarch64\nrecipe_sha256=0000\n", True),  # built by another recipe
        ("format=2\narch=aarch64\n", True),
        ("garbage", True),
        ("format=2\narch=aarch64\nrecipe_sha256={digest}\n", False),  # interpreter missing
    ],
)
def test_find_sysroot_rejects(tmp_path: Path, stamp: str | None, python: bool) -> None:
    text = None if stamp is None else stamp.format(digest=recipe_digest())
    _fake_sysroot(tmp_path, stamp=text, python=python)
    assert find_sysroot("aarch64", tmp_path) is None


def test_find_sysroot_missing_cache(tmp_path: Path) -> None:
    assert find_sysroot("aarch64", tmp_path / "nowhere") is None


def test_find_sysroot_without_the_script_checks_format_and_arch_only(tmp_path: Path) -> None:
    root = _fake_sysroot(tmp_path, stamp="format=2\narch=aarch64\nrecipe_sha256=old\n")
    assert find_sysroot("aarch64", tmp_path, script=tmp_path / "absent.sh") == root


def test_armv7_has_no_python_sysroot(tmp_path: Path) -> None:
    assert find_sysroot("armv7", tmp_path) is None
    with pytest.raises(EmulationError, match="no armv7 wheel .* apache-tvm"):
        ensure_sysroot("armv7", tmp_path)


# ---- building on demand (with a stand-in build script) ---------------------------------------


def _stand_in_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "build.sh"
    script.write_text("set -eu\n" + body)
    return script


_WRITES_SYSROOT = """
echo "building $1" >&2
mkdir -p "$1/usr/bin" && touch "$1/usr/bin/python3.11"
printf 'format=2\\narch=aarch64\\nrecipe_sha256=%s\\n' "$(sha256sum "$0" | cut -d' ' -f1)" \\
  > "$1/.edgeloop-sysroot-stamp"
"""


@pytest.fixture
def fake_qemu_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = _fake_qemu_dir(tmp_path, "qemu-aarch64-static")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir


@pytest.mark.usefixtures("fake_qemu_on_path")
def test_ensure_sysroot_builds_once_and_logs(tmp_path: Path) -> None:
    script = _stand_in_script(tmp_path, _WRITES_SYSROOT)
    lines: list[str] = []
    cache = tmp_path / "cache"
    root = ensure_sysroot("aarch64", cache, log=lines.append, script=script)
    assert root == cache / "sysroots" / "aarch64"
    assert lines == [f"building {root}"]
    lines.clear()
    assert ensure_sysroot("aarch64", cache, log=lines.append, script=script) == root
    assert lines == []  # ready: the script did not run again


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("echo 'apt: no network' >&2; exit 7\n", "exit code 7:\napt: no network"),
        ("echo done\n", "has no valid .edgeloop-sysroot-stamp"),
    ],
)
@pytest.mark.usefixtures("fake_qemu_on_path")
def test_ensure_sysroot_build_failures(tmp_path: Path, body: str, message: str) -> None:
    script = _stand_in_script(tmp_path, body)
    with pytest.raises(EmulationError, match=message):
        ensure_sysroot("aarch64", tmp_path / "cache", log=lambda _: None, script=script)


@pytest.mark.usefixtures("fake_qemu_on_path")
def test_ensure_sysroot_timeout_kills_the_build(tmp_path: Path) -> None:
    script = _stand_in_script(tmp_path, "sleep 30\n")
    start = time.monotonic()
    with pytest.raises(EmulationError, match="timed out"):
        ensure_sysroot("aarch64", tmp_path / "c", log=lambda _: None, timeout_s=0.5, script=script)
    assert time.monotonic() - start < 10


def test_ensure_sysroot_needs_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    script = _stand_in_script(tmp_path, _WRITES_SYSROOT)
    with pytest.raises(QemuNotFoundError, match="qemu-aarch64-static"):
        ensure_sysroot("aarch64", tmp_path / "cache", script=script)


# ---- the emulated command --------------------------------------------------------------------


def test_emulated_python_command_argv(tmp_path: Path) -> None:
    bindir = _fake_qemu_dir(tmp_path, "qemu-aarch64-static")
    sysroot = tmp_path / "sr"
    argv, _ = emulated_python_command(
        "arm64", sysroot, Path("/w/runner_main.py"), ["/w/work"], base_env={"PATH": str(bindir)}
    )
    assert argv == [
        str(bindir / "qemu-aarch64-static"),
        "-L",
        str(sysroot),
        str(sysroot / "usr/bin/python3.11"),
        "/w/runner_main.py",
        "/w/work",
    ]


def test_emulated_python_command_makes_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = _fake_qemu_dir(tmp_path, "qemu-aarch64-static")
    monkeypatch.chdir(tmp_path)
    argv, env = emulated_python_command(
        "aarch64", Path("sr"), Path("s.py"), [], base_env={"PATH": str(bindir)}
    )
    assert argv[2:] == [
        str(tmp_path / "sr"),
        str(tmp_path / "sr/usr/bin/python3.11"),
        str(tmp_path / "s.py"),
    ]
    assert env["PYTHONPATH"] == str(tmp_path / "sr" / "site")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("HOME", "/root", "/root"),
        ("LANG", "C.UTF-8", "C.UTF-8"),
        ("PYTHONPATH", "/host/site-packages", "{sysroot}/site"),
        ("PYTHONHOME", "/root/.pyenv", None),
        ("PYTHONSTARTUP", "/root/.pythonrc", None),
        ("PYTHONDONTWRITEBYTECODE", "", "1"),
        ("PYTHONNOUSERSITE", "", "1"),
        ("LD_LIBRARY_PATH", "/usr/lib/x86_64-linux-gnu", None),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libfoo.so", None),
        ("QEMU_LD_PREFIX", "/elsewhere", None),
        ("TVM_LIBRARY_PATH", "/root/.pyenv/tvm/lib", None),
        ("TVM_USE_RUNTIME_LIB", "0", "1"),
    ],
)
def test_emulated_python_env(tmp_path: Path, key: str, value: str, expected: str | None) -> None:
    bindir = _fake_qemu_dir(tmp_path, "qemu-aarch64-static")
    sysroot = tmp_path / "sr"
    _, env = emulated_python_command(
        "aarch64", sysroot, Path("/s.py"), [], base_env={"PATH": str(bindir), key: value}
    )
    want = None if expected is None else expected.format(sysroot=sysroot)
    assert env.get(key) == want
    assert env["PATH"] == str(bindir)


def test_emulated_python_command_missing_qemu(tmp_path: Path) -> None:
    with pytest.raises(QemuNotFoundError, match="qemu-aarch64-static.*qemu-user-static"):
        emulated_python_command(
            "aarch64", tmp_path, Path("/s.py"), [], base_env={"PATH": str(tmp_path)}
        )


@pytest.mark.parametrize("arch", ["armv7", "arm"])
def test_emulated_python_command_refuses_armv7(tmp_path: Path, arch: str) -> None:
    bindir = _fake_qemu_dir(tmp_path, "qemu-arm-static")
    with pytest.raises(EmulationError, match="no Python sysroot for armv7"):
        emulated_python_command(arch, tmp_path, Path("/s.py"), [], base_env={"PATH": str(bindir)})


# ---- the real thing: an aarch64 artifact under qemu ------------------------------------------


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine that lacks a tool; fail in CI, where the test must run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the qemu test: {reason}")
    pytest.skip(reason)


def _tiny_onnx_model(path: Path) -> None:
    from onnx import TensorProto, checker, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        # Two outputs: the runner must flatten the VM's tuple.
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("pre", TensorProto.FLOAT, [2, 4]),
        ],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    save(model, str(path))


def _compile_aarch64(onnx_path: Path, so_path: Path) -> None:
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    tvm.compile(mod, target=target).export_library(str(so_path), cc="aarch64-linux-gnu-gcc")


@pytest.mark.slow
@pytest.mark.qemu
def test_runner_main_under_qemu_matches_onnxruntime(tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        _unavailable("aarch64-linux-gnu-gcc not found: install Debian gcc-aarch64-linux-gnu")
    for module in ("onnx", "onnxruntime", "tvm"):
        try:
            __import__(module)
        except ImportError:
            _unavailable(f"{module} not installed: pip install 'edgeloop[compiler]'")
    try:
        sysroot = ensure_sysroot("aarch64")
    except QemuNotFoundError as err:
        _unavailable(str(err))

    import onnxruntime as ort

    onnx_path, so_path = tmp_path / "tiny.onnx", tmp_path / "tiny_aarch64.so"
    _tiny_onnx_model(onnx_path)
    _compile_aarch64(onnx_path, so_path)

    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(2)]
    for k, sample in enumerate(samples):
        np.save(work / f"s{k}_in0.npy", sample)
    request = {"lib": str(so_path), "num_samples": 2, "num_inputs": 1, "warmup": 1, "repeat": 3}
    (work / "request.json").write_text(json.dumps(request))

    argv, env = emulated_python_command("aarch64", sysroot, RUNNER, [str(work)])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}"

    result = json.loads((work / "result.json").read_text())
    assert result["machine"] == "aarch64"
    assert result["num_outputs"] == 2
    assert result["runtime"] == "tvm 0.27.0.post1"
    assert len(result["latency_ms"]) == 3

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for k, sample in enumerate(samples):
        expected = session.run(None, {"x": sample})
        for j, want in enumerate(expected):
            got = np.load(work / f"s{k}_out{j}.npy")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""CUDA artifacts built without a GPU carry nvcc-compiled device code for the profile's arch."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compiler import cuda
from compiler.bundle import verify_bundle
from compiler.pipeline import CompileRequest, compile_model
from compiler.settings import CompilerSettings
from compiler.signing import generate_keys, load_public_key
from tests.compiler import models

GPU_PROFILES = [("nvidia/h100", "sm_90"), ("nvidia/jetson-orin-nano", "sm_87")]
HAS_GPU = any(Path(node).exists() for node in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu"))
needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
    reason="nvcc (CUDA toolkit) is not installed",
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """One CNN artifact per GPU profile (compiled once for the module) and the signing key."""
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    root = tmp_path_factory.mktemp("cuda")
    model = models.export_onnx("cnn", root / "cnn.onnx")
    key = generate_keys(root / "keys").private
    settings = CompilerSettings(config_dir=root / "config", tuning_db=root / "tuning")
    built = {}
    for profile, _arch in GPU_PROFILES:
        out = root / profile.replace("/", "_")
        request = CompileRequest(
            model=model, profile=profile, output=out, signing_key=key, trials=0
        )
        compile_model(request, settings=settings)
        built[profile] = (out, key)
    return built


@needs_nvcc
@pytest.mark.parametrize(("profile", "arch"), GPU_PROFILES)
def test_library_carries_sass_for_the_profile_arch(
    profile: str, arch: str, artifacts: dict[str, tuple[Path, Path]]
) -> None:
    out, key = artifacts[profile]
    verified = verify_bundle(out, load_public_key(key.with_suffix(".pub")))
    library = out / "model.so"
    blob = cuda.read_library_bin(library)
    tree = cuda.parse_library_bin(blob)
    payloads = [p for kind, p in tree.modules if kind == "cuda"]
    assert len(payloads) == 1 and payloads[0] is not None
    module = cuda.parse_cuda_payload(payloads[0])
    assert module.fmt == "fatbin" and len(module.kernels) >= 3
    images = cuda.fatbin_images(module.code)
    # TVM labels a build-time JIT result "cubin" whatever it is: images are read by content.
    assert cuda.device_images("cubin", module.code) == images
    assert {(i.kind, i.arch) for i in images} == {
        ("sass", arch),
        ("ptx", arch.replace("sm", "compute")),
    }
    # Independently of the fatbin header: the ELF image is a cubin whose e_flags name the arch.
    elf_at = module.code.index(b"\x7fELF")
    (e_machine,) = struct.unpack_from("<H", module.code, elf_at + 18)
    (e_flags,) = struct.unpack_from("<I", module.code, elf_at + 48)
    assert e_machine == cuda.EM_CUDA and f"sm_{(e_flags >> 8) & 0xFF}" == arch
    # No CUDA source left anywhere in the library: nothing to compile when it is loaded.
    data = library.read_bytes()
    assert b'extern "C" __global__' not in data and b"#include <cuda" not in data
    assert verified.manifest.target["arch"] == arch
    if shutil.which("cuobjdump"):  # on machines with the full toolkit (the GPU machines)
        fatbin = out.parent / f"{arch}.fatbin"
        fatbin.write_bytes(module.code)
        listed = subprocess.run(
            ["cuobjdump", "--list-elf", str(fatbin)], capture_output=True, text=True, check=True
        ).stdout
        assert arch in listed


@needs_nvcc
@pytest.mark.parametrize(("profile", "arch"), GPU_PROFILES)
def test_report_states_device_code_and_hardware(
    profile: str, arch: str, artifacts: dict[str, tuple[Path, Path]]
) -> None:
    out, key = artifacts[profile]
    report = verify_bundle(out, load_public_key(key.with_suffix(".pub"))).report()
    code = report["static_checks"]["device_code"]
    assert code["format"] == "fatbin" and code["sass_archs"] == [arch]
    assert code["cuda_source"] is False and code["needs_compiler_at_load"] is False
    # CUDA targets share the tuning database layout of CPU targets: one directory per target.
    from compiler.profiles import ProfileRegistry
    from compiler.tvm_builder import effective_target, target_key

    registry = ProfileRegistry([Path(__file__).resolve().parents[2] / "hw-profiles"])
    target = effective_target(registry.get(profile))
    assert report["tuning"]["target_key"] == target_key(target)
    assert report["tuning"]["new_trials"] == 0 and report["tuning"]["tasks_total"] >= 3
    target_json = out.parent / "tuning" / target_key(target) / "target.json"
    assert json.loads(target_json.read_text())["arch"] == arch
    if not HAS_GPU:
        assert report["verification"]["executed"] is False
        assert report["verification"]["hardware"] == "not verified on hardware"
        assert "not verified on hardware" in report["verification"]["reason"]


@needs_nvcc
@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU; the refusal needs none")
def test_agent_refuses_cuda_artifact_without_gpu(
    artifacts: dict[str, tuple[Path, Path]],
) -> None:
    from agent import runtimes

    out, key = artifacts["nvidia/h100"]
    manifest = verify_bundle(out, load_public_key(key.with_suffix(".pub"))).manifest
    with pytest.raises(runtimes.GpuUnavailableError, match=r"CUDA GPU \(sm_90\)") as err:
        runtimes.load(out, manifest)
    assert err.value.http_status == 503


# A stand-in for the NVIDIA driver (libcuda.so.1), so that TVM's own CUDA runtime plugin can
# be loaded on a machine without a GPU: every call reports CUDA_ERROR_NO_DEVICE. Nothing here
# runs a kernel; it lets TVM's C++ loader deserialize the module the builder rewrote.
_DRIVER_STUB = """
#define STUB(name) int name(void) { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuGetErrorName) STUB(cuGetErrorString)
STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction) STUB(cuModuleLoadData) STUB(cuModuleUnload)
STUB(cuTensorMapEncodeTiled)
"""
_LOAD_WITH_TVM = """
import ctypes, json, sys
from pathlib import Path
from tvm import runtime
from tvm.runtime.vm import VirtualMachine
plugin = Path(runtime.__file__).parents[1] / "lib" / "libtvm_runtime_cuda.so"
ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
lib = runtime.load_module(sys.argv[1])
VirtualMachine(lib, runtime.cpu(0))
stack, found = [lib], []
while stack:
    m = stack.pop()
    stack.extend(m.imports)
    if m.kind == "cuda":
        found.append({
            "kernel": m.implements_function(sys.argv[2]),
            "bogus": m.implements_function("no_such_kernel"),
            "source": m.inspect_source("cuda"),
        })
print(json.dumps(found))
"""
CUDART_DIRS = [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/targets/x86_64-linux/lib")]


@needs_nvcc
def test_tvm_runtime_deserializes_the_fatbin_module(
    artifacts: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    cudart = [d for d in CUDART_DIRS if list(d.glob("libcudart.so.*"))]
    if shutil.which("gcc") is None or not cudart:
        pytest.skip("needs gcc and CUDA's libcudart.so to load TVM's CUDA runtime plugin")
    out, _key = artifacts["nvidia/h100"]
    module = cuda.parse_cuda_payload(
        next(
            p
            for k, p in cuda.parse_library_bin(cuda.read_library_bin(out / "model.so")).modules
            if k == "cuda"
        )
        or b""
    )
    (tmp_path / "stub.c").write_text(_DRIVER_STUB)
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(tmp_path / "libcuda.so.1"),
            str(tmp_path / "stub.c"),
        ],
        check=True,
    )
    env = {
        **os.environ,
        "TVM_USE_RUNTIME_LIB": "1",
        "LD_LIBRARY_PATH": ":".join([str(tmp_path), *map(str, cudart)]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_TVM, str(out / "model.so"), module.kernels[0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # TVM's loader read [fmt][fmap][code]: the kernel table is intact, and no source is left.
    assert found == [{"kernel": True, "bogus": False, "source": ""}]


# ------------------------------------------------------------------ pure parsers


def _blob(modules: list[tuple[str, bytes | None]]) -> bytes:
    n = len(modules)
    return cuda.LibraryBin(list(range(n)) + [n - 1], list(range(1, n)), modules).to_bytes()


def _payload(fmt: str, code: bytes, kernels: tuple[str, ...] = ("k0",)) -> bytes:
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    fmap = struct.pack("<Q", len(kernels))
    for name in kernels:
        # key, FunctionInfo(name, 2 arg types, 1 launch tag, 2 extra tags)
        fmap += s(name.encode()) + s(name.encode())
        fmap += struct.pack("<Q", 2) + b"\x03\x40\x01\x00" * 2
        fmap += struct.pack("<Q", 1) + s(b"threadIdx.x")
        fmap += struct.pack("<Q", 2) + b"\x00" * 8
    return s(fmt.encode()) + fmap + s(code)


def test_library_bin_round_trip_and_rewrite() -> None:
    source = b'extern "C" __global__ void k0() {}'
    blob = _blob(
        [("relax.VMExecutable", b"vm"), ("_lib", None), ("cuda", _payload("cuda", source))]
    )
    tree = cuda.parse_library_bin(blob)
    assert [k for k, _ in tree.modules] == ["relax.VMExecutable", "_lib", "cuda"]
    assert tree.to_bytes() == blob
    report = cuda.inspect_library_bin(blob)
    assert report.cuda_source and report.needs_compiler_at_load and report.kernels == 1
    assert cuda.check_device_code(report, "sm_90")[0].startswith("the CUDA module is cuda source")

    seen: list[str] = []

    def not_a_fatbin(src: str) -> bytes:
        seen.append(src)
        return b"PTX?"

    with pytest.raises(cuda.DeviceCodeError, match="fatbin"):
        cuda.rewrite_cuda_modules(blob, not_a_fatbin)
    assert seen == [source.decode()]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01", "truncated"),
        (struct.pack("<Q", 100) + b"\x00" * 8, "runs past the end"),
        (struct.pack("<QQQQ", 24, 1, 5, 0), "does not fit"),
    ],
)
def test_malformed_library_bin_is_refused(blob: bytes, message: str) -> None:
    with pytest.raises(cuda.DeviceCodeError, match=message):
        cuda.parse_library_bin(blob)


@pytest.mark.parametrize(
    ("report", "arch", "problem"),
    [
        (cuda.DeviceCodeReport(format=None), "sm_90", "no CUDA module"),
        (cuda.DeviceCodeReport("fatbin", ["sm_87"], ["compute_87"]), "sm_90", "no SASS for sm_90"),
        (cuda.DeviceCodeReport("fatbin", ["sm_90"], ["compute_90"]), "sm_90", None),
    ],
)
def test_check_device_code(report: Any, arch: str, problem: str | None) -> None:
    problems = cuda.check_device_code(report, arch)
    assert (problem in problems[0]) if problem else problems == []


@pytest.mark.parametrize(
    ("arch", "flags"),
    [
        ("sm_90", ["arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]),
        ("sm_90a", ["arch=compute_90a,code=sm_90a", "arch=compute_90,code=compute_90"]),
        ("sm_87", ["arch=compute_87,code=sm_87", "arch=compute_87,code=compute_87"]),
    ],
)
def test_nvcc_gencode(arch: str, flags: list[str]) -> None:
    assert cuda.nvcc_gencode(arch)[1::2] == flags


@pytest.mark.parametrize("arch", ["90", "compute_90", "sm_x", ""])
def test_nvcc_gencode_refuses_bad_arch(arch: str) -> None:
    with pytest.raises(cuda.DeviceCodeError, match="expected e.g. sm_87"):
        cuda.nvcc_gencode(arch)


def test_fatbin_with_wrong_magic_is_refused() -> None:
    with pytest.raises(cuda.DeviceCodeError, match="magic"):
        cuda.fatbin_images(b"\x7fELF" + b"\x00" * 60)


@pytest.mark.parametrize(
    ("profile", "host", "mode", "reason"),
    [
        ("nvidia/h100", ("x86_64", False), "none", "no CUDA GPU on this machine"),
        ("nvidia/h100", ("x86_64", True), "cuda", None),
        ("nvidia/l4", ("x86_64", True), "cuda", None),
        ("nvidia/jetson-orin-nano", ("x86_64", True), "none", "host code is aarch64"),
        ("nvidia/jetson-orin-nano", ("aarch64", True), "cuda", None),
    ],
)
def test_gpu_execution_plan(
    profile: str, host: tuple[str, bool], mode: str, reason: str | None
) -> None:
    from compiler.execution import HostFacts, plan_execution
    from compiler.profiles import ProfileRegistry

    registry = ProfileRegistry([Path(__file__).resolve().parents[2] / "hw-profiles"])
    facts = HostFacts(host[0], frozenset({"avx2", "fma", "asimd"}), has_cuda_gpu=host[1])
    plan = plan_execution(registry.get(profile), facts)
    assert plan.mode == mode
    if reason:
        assert plan.reason is not None and reason in plan.reason
        assert "not verified on hardware" in plan.reason
    else:
        assert plan.reason is None and plan.where.startswith("cuda sm_")


def _registry() -> Any:
    from compiler.profiles import ProfileRegistry

    return ProfileRegistry([Path(__file__).resolve().parents[2] / "hw-profiles"])


def test_tuning_a_cuda_profile_is_refused_without_a_gpu(tmp_path: Path) -> None:
    from compiler.errors import UsageError
    from compiler.execution import HostFacts

    model = models.export_onnx("mlp", tmp_path / "mlp.onnx")
    key = generate_keys(tmp_path / "keys").private
    settings = CompilerSettings(config_dir=tmp_path / "config", tuning_db=tmp_path / "tuning")
    request = CompileRequest(
        model=model, profile="nvidia/l4", output=tmp_path / "out", signing_key=key, trials=4
    )
    no_gpu = HostFacts("x86_64", frozenset({"avx2", "fma"}), has_cuda_gpu=False)
    with pytest.raises(
        UsageError,
        match="--trials 4 for nvidia/l4: MetaSchedule tuning of a CUDA target needs a CUDA GPU "
        "on this machine to measure on.*no CUDA GPU on this machine",
    ):
        compile_model(request, settings=settings, host=no_gpu)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "tuning").exists()


@pytest.mark.parametrize(
    ("profile", "host", "trials", "refused"),
    [
        # No GPU: refused, whatever the host ISA.
        ("nvidia/h100", ("x86_64", False), 16, "no CUDA GPU on this machine"),
        ("nvidia/jetson-orin-nano", ("aarch64", False), 16, "no CUDA GPU on this machine"),
        # A GPU, but host code this machine cannot run natively: refused.
        ("nvidia/jetson-orin-nano", ("x86_64", True), 16, "its host code is aarch64"),
        ("nvidia/h100", ("aarch64", True), 1, "its host code is x86_64"),
        # A GPU and native host code: tuned.
        ("nvidia/h100", ("x86_64", True), 16, None),
        ("nvidia/a100", ("x86_64", True), 1, None),
        ("nvidia/jetson-orin-nano", ("aarch64", True), 16, None),
        # No tuning asked for: nothing to refuse, GPU or not.
        ("nvidia/h100", ("x86_64", False), 0, None),
        ("nvidia/jetson-orin-nano", ("x86_64", True), 0, None),
        # CPU profiles are not decided by the CUDA rule.
        ("generic/x86_64", ("x86_64", False), 16, None),
        ("raspberry-pi/4b-aarch64", ("x86_64", True), 16, None),
    ],
)
def test_cuda_tuning_decision(
    profile: str, host: tuple[str, bool], trials: int, refused: str | None
) -> None:
    from compiler.execution import HostFacts, plan_execution
    from compiler.pipeline import cuda_tuning_refusal

    hw = _registry().get(profile)
    facts = HostFacts(host[0], frozenset({"avx2", "fma", "asimd"}), has_cuda_gpu=host[1])
    reason = cuda_tuning_refusal(hw, plan_execution(hw, facts), trials)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None
        assert reason.startswith(f"--trials {trials} for {profile}: ")
        assert "needs a CUDA GPU on this machine to measure on" in reason
        assert refused in reason and "--trials 0" in reason


@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU; the refusal needs none")
def test_build_library_refuses_cuda_tuning_when_tvm_sees_no_device(tmp_path: Path) -> None:
    from compiler.errors import UsageError
    from compiler.frontends import load_model
    from compiler.tvm_builder import build_library, cuda_device_present

    assert cuda_device_present() is False
    relax_mod = load_model(models.export_onnx("mlp", tmp_path / "mlp.onnx")).to_relax()
    with pytest.raises(UsageError, match="needs a CUDA GPU on this machine.*TVM sees none"):
        build_library(
            relax_mod,
            _registry().get("nvidia/h100"),
            out_path=tmp_path / "model.so",
            trials=4,
            tuning_db=tmp_path / "tuning",
        )
    assert not (tmp_path / "model.so").exists()


def test_cuda_tuning_tasks_and_design_space_without_a_gpu(tmp_path: Path) -> None:
    """What tuning would measure for a CUDA target is built here, without a device."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from compiler import tvm_builder
    from compiler.frontends import load_model

    profile = _registry().get("nvidia/h100")
    target = tvm.target.Target(tvm_builder.effective_target(profile))
    relax_mod = load_model(models.export_onnx("mlp", tmp_path / "mlp.onnx")).to_relax()
    mod = tvm_builder._prepare(relax_mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # Tasks come from the model before dlight: one per fused matmul layer of the MLP.
    assert sorted(t.task_name for t in tasks) == [
        "fused_matmul1_add_tir_tanh",
        "fused_matmul2_add1",
        "fused_matmul_add_relu",
    ]
    assert all(t.target.kind.name == "cuda" for t in tasks)
    contexts, _weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=str(tmp_path / "ms"), num_threads=1
    )
    costs = tvm_builder.task_costs(tasks, contexts)
    assert all(c.flops > 0 and c.max_useful is None for c in costs)  # sampled: tunable
    limit = int(profile.tvm["max_threads_per_block"])
    for context in contexts:
        # Candidates breaking the target's thread / shared-memory limits are rejected.
        postprocs = [type(p).__name__ for p in context.space_generator.postprocs]
        assert "VerifyGPUCode" in postprocs
        for space in context.generate_design_space():
            script = space.mod.script()
            # MetaSchedule's CUDA space: kernels on blockIdx/threadIdx, operands in shared memory.
            assert 'thread="blockIdx.x"' in script and 'thread="threadIdx.x"' in script
            assert 'scope="shared"' in script
            threads = re.findall(
                r'thread_binding\(T\.int64\((\d+)\), thread="threadIdx\.x"', script
            )
            assert threads and all(0 < int(n) <= limit for n in threads)


@needs_nvcc
def test_build_time_jit_callback_gives_the_profile_fatbin_and_is_restored() -> None:
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    before = tvm_ffi.get_global_func(name, allow_missing=True)
    kernel = 'extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n'
    with cuda.nvcc_jit("sm_80"):
        fatbin = bytes(tvm_ffi.get_global_func(name)(kernel))
    images = {(i.kind, i.arch) for i in cuda.fatbin_images(fatbin)}
    assert images == {("sass", "sm_80"), ("ptx", "compute_80")}
    after = tvm_ffi.get_global_func(name, allow_missing=True)
    assert (after is None) if before is None else after.same_as(before)

"""Model runtimes of the agent: load a verified bundle once, run it from any thread.

Which runtime loads a bundle is the manifest's ``runtime`` field:

* ``tvm``: the Relax VM executable ``model.so`` with TVM's *runtime-only* library
  (``TVM_USE_RUNTIME_LIB=1``, see :func:`prepare_tvm_runtime_env`); only ``tvm.runtime``
  pieces are imported, never the 259 MB compiler library.
* ``onnxruntime``: an ``InferenceSession`` on ``model.onnx``, CPU provider.
* ``tflite``: the LiteRT interpreter (``ai_edge_litert``), else ``tflite_runtime``.
* ``ethos-u``: a Vela-compiled ``.tflite`` (``ethos-u`` custom ops) run by the LiteRT
  interpreter with the Ethos-U external delegate (``RuntimeOptions.ethos_u_delegate``, else
  the i.MX93 BSP's ``/usr/lib/libethosu_op_delegate.so``); refused with the reason when the
  delegate is not on the device (compiler/npu, docs/npu.md).

Nothing heavy is imported here at import time: each runtime imports its package inside
:func:`load`, so ``edgeloop-agent`` starts fast and a device needs only the runtime it uses.

Thread safety: :meth:`LoadedModel.infer` may be called from many HTTP threads at once. A
TVM VM and a TFLite interpreter keep per-call state, so calls to one such model are
serialised by a lock per model; an ONNX Runtime session is documented thread-safe and runs
concurrently (bounded by the server's per-model concurrency limit).

Exception tree (``http_status`` is what the inference server answers)::

    ServingError (500)
    ├── RuntimeUnavailableError (503): the runtime's package is not installed
    ├── ModelLoadError (500): the entry file cannot be loaded
    │   ├── GpuUnavailableError (503): a CUDA artifact on a device without a usable GPU
    │   └── NpuUnavailableError (503): an Ethos-U artifact on a device without the delegate
    ├── SelfTestError (500): the warm-up run failed or gave wrong/non-finite outputs
    ├── InferenceError (500): the runtime failed on a valid request
    ├── InvalidInputError (400): wrong input name, count, shape or dtype
    ├── ModelNotFoundError (404): unknown model or version
    ├── ModelNotReadyError (503): the model is registered but not loaded yet
    └── ServerBusyError (503): too many concurrent inferences on a model
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compiler.manifest import ArtifactManifest, RuntimeName, TensorSpec

Array = npt.NDArray[Any]

# runtime name -> (importable top-level modules, any one suffices; pip package to install)
_RUNTIME_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tvm": (("tvm",), "apache-tvm"),
    "onnxruntime": (("onnxruntime",), "onnxruntime"),
    "tflite": (("ai_edge_litert", "tflite_runtime"), "ai-edge-litert"),
    "ethos-u": (("ai_edge_litert", "tflite_runtime"), "ai-edge-litert"),
}
# Where NXP's i.MX93 Linux BSP installs the Ethos-U external delegate of TFLite/LiteRT.
ETHOS_U_DELEGATE_PATHS: tuple[Path, ...] = (
    Path("/usr/lib/libethosu_op_delegate.so"),
    Path("/usr/lib/aarch64-linux-gnu/libethosu_op_delegate.so"),
)


# ------------------------------------------------------------------ errors


class ServingError(Exception):
    """Root of every error the agent's serving code raises on purpose."""

    http_status = 500


class RuntimeUnavailableError(ServingError):
    """The runtime a bundle needs is not installed on this device."""

    http_status = 503

    def __init__(self, runtime: str, detail: str = "") -> None:
        package = _RUNTIME_PACKAGES.get(runtime, ((), runtime))[1]
        self.runtime = runtime
        self.package = package
        message = (
            f"runtime {runtime!r} is not available on this device; "
            f"install it with: pip install {package}"
        )
        super().__init__(f"{message} ({detail})" if detail else message)


class ModelLoadError(ServingError):
    """The bundle's entry file could not be loaded by its runtime."""


class GpuUnavailableError(ModelLoadError):
    """A CUDA artifact, and this device has no usable CUDA GPU (or driver) for it."""

    http_status = 503


class NpuUnavailableError(ModelLoadError):
    """An NPU (Ethos-U) artifact, and this device has no NPU delegate to run it with."""

    http_status = 503


class SelfTestError(ServingError):
    """The warm-up self-test failed: an error, wrong output shapes or non-finite values."""


class InferenceError(ServingError):
    """The runtime failed while running a request whose inputs matched the signature."""


class InvalidInputError(ServingError):
    """Inputs that do not match the model's signature (names, count, shape or dtype)."""

    http_status = 400


class ModelNotFoundError(ServingError):
    """No model, or no such version of it, is served."""

    http_status = 404


class ModelNotReadyError(ServingError):
    """The model is registered (activation under way) but has no loaded version yet."""

    http_status = 503


class ServerBusyError(ServingError):
    """The model already runs as many inferences as it may; retry later."""

    http_status = 503


# ------------------------------------------------------------------ signature


def format_shape(shape: Sequence[int]) -> str:
    """``[1,3,16,16]``: the compact shape spelling used in every message."""
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a model, in call order, as the manifest declares them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, manifest: ArtifactManifest) -> Signature:
        """The signature a manifest declares."""
        return cls(tuple(manifest.inputs), tuple(manifest.outputs))

    def describe_inputs(self) -> str:
        """``expected input 'input' float32 [1,3,16,16]`` (numpy dtype names)."""
        noun = "input" if len(self.inputs) == 1 else "inputs"
        specs = ", ".join(f"{s.name!r} {s.dtype} {format_shape(s.shape)}" for s in self.inputs)
        return f"expected {noun} {specs}"

    def check_inputs(self, inputs: Sequence[Array]) -> None:
        """Check count, shape and dtype of positional inputs.

        Raises:
            InvalidInputError: naming the first mismatch and the expected signature.
        """
        if len(inputs) != len(self.inputs):
            raise InvalidInputError(f"got {len(inputs)} input(s); {self.describe_inputs()}")
        for spec, array in zip(self.inputs, inputs, strict=True):
            if array.dtype != np.dtype(spec.dtype) or list(array.shape) != spec.shape:
                raise InvalidInputError(
                    f"input {spec.name!r} is {array.dtype} {format_shape(array.shape)}; "
                    f"{self.describe_inputs()}"
                )


def random_inputs(signature: Signature, *, seed: int = 0) -> list[Array]:
    """Seeded random inputs of the declared shapes and dtypes (floats ~ N(0,1), ints in [0,2))."""
    rng = np.random.default_rng(seed)
    arrays: list[Array] = []
    for spec in signature.inputs:
        dtype = np.dtype(spec.dtype)
        if dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=spec.shape).astype(np.bool_))
        elif np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(spec.shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 2, size=spec.shape).astype(dtype))
    return arrays


# ------------------------------------------------------------------ loaded models


class LoadedModel(ABC):
    """A model loaded once by its runtime, callable from any thread.

    Subclasses implement :meth:`_run`; :meth:`infer` checks the inputs against the signature
    and serialises calls when the runtime is not thread-safe.
    """

    def __init__(self, signature: Signature, *, runtime: str, thread_safe: bool) -> None:
        self.signature = signature
        self.runtime = runtime
        self._lock: threading.Lock | None = None if thread_safe else threading.Lock()
        self.warmup_ms: float | None = None

    @abstractmethod
    def _run(self, inputs: list[Array]) -> list[Array]:
        """Run the model on checked inputs; return outputs in declared order."""

    def infer(self, inputs: list[Array]) -> list[Array]:
        """Run the model on positional inputs of the declared shapes and dtypes.

        Args:
            inputs: one array per declared input, in declared order.

        Returns:
            One array per declared output, in declared order.

        Raises:
            InvalidInputError: an input does not match the signature.
            InferenceError: the runtime failed.
        """
        self.signature.check_inputs(inputs)
        try:
            if self._lock is None:
                return self._run(inputs)
            with self._lock:
                return self._run(inputs)
        except ServingError:
            raise
        except Exception as err:
            raise InferenceError(f"{self.runtime} inference failed: {err}") from err

    def self_test(self, *, seed: int = 0, runs: int = 2) -> None:
        """Warm up on seeded random inputs and check the outputs against the signature.

        The latency of the last run is kept in :attr:`warmup_ms`.

        Args:
            seed: random seed of the inputs.
            runs: how many times to run (the first run also warms caches up).

        Raises:
            SelfTestError: the model failed, or returned outputs of the wrong count or shape,
                or values that are not finite.
        """
        inputs = random_inputs(self.signature, seed=seed)
        outputs: list[Array] = []
        latency_ms = math.nan
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            try:
                outputs = self.infer(inputs)
            except ServingError as err:
                raise SelfTestError(f"self-test run failed: {err}") from err
            latency_ms = (time.perf_counter() - start) * 1000.0
        declared = self.signature.outputs
        if len(outputs) != len(declared):
            raise SelfTestError(
                f"self-test: model returned {len(outputs)} output(s), "
                f"the manifest declares {len(declared)}: {', '.join(s.name for s in declared)}"
            )
        for spec, out in zip(declared, outputs, strict=True):
            if list(out.shape) != spec.shape:
                raise SelfTestError(
                    f"self-test: output {spec.name!r} has shape {format_shape(out.shape)}, "
                    f"declared {format_shape(spec.shape)}"
                )
            if np.issubdtype(out.dtype, np.inexact):
                bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
                if bad:
                    raise SelfTestError(
                        f"self-test: output {spec.name!r} has {bad} non-finite value(s) "
                        f"of {out.size} on seeded random inputs (seed {seed})"
                    )
        self.warmup_ms = latency_ms


def _tvm_thread_env(num_threads: int | None) -> None:
    """Size TVM's thread pool before it starts (it reads the environment once per process).

    Same rule as the compiler's latency runs (``compiler.runtime_choice``): ``num_threads``,
    else ``TVM_NUM_THREADS`` if the operator set it, else all usable CPUs, unpinned (a
    pinned worker that gets preempted stalls every parallel loop on a busy device).
    """
    from compiler.runtime_choice import tvm_thread_env

    if num_threads is None:
        if "TVM_NUM_THREADS" in os.environ:
            return
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    for key, value in tvm_thread_env(num_threads).items():
        os.environ[key] = value if key == "TVM_NUM_THREADS" else os.environ.get(key, value)


CUDA_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu")  # discrete GPUs; Jetson


def _cuda_device(tvm_runtime: Any, arch: str) -> Any:
    """TVM's ``cuda(0)`` once the CUDA runtime plugin is loaded; refuses without a fit GPU.

    The TVM wheel keeps CUDA support in ``lib/libtvm_runtime_cuda.so`` (it needs the driver's
    ``libcuda.so.1``); loading it RTLD_GLOBAL registers the loader of CUDA modules. The
    artifact carries SASS for ``arch`` and PTX of the same version, so any GPU of that
    compute capability or newer runs it without a CUDA compiler.
    """
    import ctypes

    lib = Path(tvm_runtime.__file__).parents[1] / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        if not any(Path(node).exists() for node in CUDA_DEVICE_NODES):
            raise GpuUnavailableError(
                f"this artifact runs on a CUDA GPU ({arch}) and this device has none "
                f"(no {' or '.join(CUDA_DEVICE_NODES)}, and TVM's CUDA runtime cannot load: "
                f"{err}); deploy an artifact of a CPU profile here"
            ) from err
        raise GpuUnavailableError(
            f"this artifact runs on a CUDA GPU ({arch}) but TVM's CUDA runtime cannot load: "
            f"{err} (is the NVIDIA driver, libcuda.so.1, installed?)"
        ) from err
    device = tvm_runtime.cuda(0)
    if not device.exist:
        raise GpuUnavailableError(
            f"this artifact runs on a CUDA GPU ({arch}); the driver reports no usable GPU"
        )
    have = int(str(device.compute_version).replace(".", ""))
    need = int("".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit()) or "0")
    if have < need:
        raise GpuUnavailableError(
            f"this artifact is built for {arch}; this GPU ({device.device_name}) is "
            f"sm_{have}, older than the code it carries"
        )
    return device


class _TvmModel(LoadedModel):
    """A Relax VM executable; the VM keeps per-call state, so calls are serialised."""

    def __init__(
        self,
        signature: Signature,
        lib_path: Path,
        *,
        num_threads: int | None,
        cuda_arch: str | None = None,
    ) -> None:
        super().__init__(signature, runtime="tvm", thread_safe=False)
        prepare_tvm_runtime_env()
        _tvm_thread_env(num_threads)
        from compiler.runner_main import VmCaller, import_tvm_runtime

        try:
            import_tvm_runtime()
            from tvm import runtime as tvm_runtime
            from tvm.runtime.vm import VirtualMachine
        except ImportError as err:
            raise RuntimeUnavailableError("tvm", str(err)) from err
        self.device_name = "cpu"
        if cuda_arch is not None:
            self._device = _cuda_device(tvm_runtime, cuda_arch)
            self.device_name = f"cuda {self._device.device_name}"
        # The compiler times artifacts through the same caller (compiler/runner_main.py):
        # inputs copied into tensors bound once to a saved closure of "main", outputs copied
        # out through DLPack; CUDA artifacts take the plain conversions.
        try:
            if cuda_arch is None:
                self._device = tvm_runtime.cpu(0)
            vm = VirtualMachine(tvm_runtime.load_module(str(lib_path)), self._device)
            self._call = VmCaller(
                vm, self._device, "main", [(tuple(s.shape), s.dtype) for s in signature.inputs]
            )
        except Exception as err:
            raise ModelLoadError(f"TVM cannot load {lib_path}: {err}") from err
        self._vm = vm  # the caller keeps a reference, but make the owner explicit

    def _run(self, inputs: list[Array]) -> list[Array]:
        return self._call(inputs)


class _OrtModel(LoadedModel):
    """An ONNX Runtime session; ``InferenceSession.run`` is thread-safe."""

    def __init__(self, signature: Signature, model_path: Path, *, num_threads: int | None) -> None:
        super().__init__(signature, runtime="onnxruntime", thread_safe=True)
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise RuntimeUnavailableError("onnxruntime", str(err)) from err
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ModelLoadError(f"ONNX Runtime cannot load {model_path}: {err}") from err
        names = [i.name for i in self._session.get_inputs()]
        expected = [s.name for s in signature.inputs]
        if sorted(names) != sorted(expected):
            raise ModelLoadError(
                f"{model_path} has inputs {names}; the manifest declares {expected}"
            )
        self._input_names = expected
        self._output_names = [s.name for s in signature.outputs]

    def _run(self, inputs: list[Array]) -> list[Array]:
        feed = dict(zip(self._input_names, inputs, strict=True))
        return [np.asarray(out) for out in self._session.run(self._output_names, feed)]


class _TfliteModel(LoadedModel):
    """A TFLite interpreter; it holds its tensors, so calls are serialised."""

    def __init__(self, signature: Signature, model_path: Path, *, num_threads: int | None) -> None:
        super().__init__(signature, runtime="tflite", thread_safe=False)
        interpreter_cls = _tflite_interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(model_path), num_threads=num_threads)
            self._interp.allocate_tensors()
        except Exception as err:
            raise ModelLoadError(f"TFLite cannot load {model_path}: {err}") from err
        self._inputs = _match_details(self._interp.get_input_details(), signature.inputs)
        self._outputs = _match_details(self._interp.get_output_details(), signature.outputs)

    def _run(self, inputs: list[Array]) -> list[Array]:
        for index, array in zip(self._inputs, inputs, strict=True):
            self._interp.set_tensor(index, array)
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(index)) for index in self._outputs]


def _tflite_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter as LegacyInterpreter

        return LegacyInterpreter
    except ImportError as err:
        raise RuntimeUnavailableError("tflite", str(err)) from err


def _match_details(details: list[dict[str, Any]], specs: Sequence[TensorSpec]) -> list[int]:
    """Tensor indices in declared order: by name when all names match, else by position."""
    if len(details) != len(specs):
        raise ModelLoadError(
            f"the .tflite model has {len(details)} tensors where the manifest declares "
            f"{len(specs)}: {', '.join(s.name for s in specs)}"
        )
    by_name = {str(d["name"]): int(d["index"]) for d in details}
    if all(s.name in by_name for s in specs):
        return [by_name[s.name] for s in specs]
    return [int(d["index"]) for d in details]


# ------------------------------------------------------------------ choosing and loading


def prepare_tvm_runtime_env() -> bool:
    """Make this process load TVM's runtime-only library, if TVM is not imported yet.

    Sets ``TVM_USE_RUNTIME_LIB=1`` (libtvm_runtime + libtvm_ffi, ~6 MB, instead of the
    259 MB compiler library). Once ``tvm`` is imported the choice is made for the process.

    Returns:
        True when TVM runs (or will run) from the runtime-only library.
    """
    base = sys.modules.get("tvm.base")
    if base is not None or "tvm" in sys.modules:
        return bool(getattr(base, "_RUNTIME_ONLY", False))
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    return True


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime``'s package can be imported here (checked without importing it)."""
    modules = _RUNTIME_PACKAGES.get(runtime, ((), ""))[0]
    return any(_importable(m) for m in modules)


def available_runtimes(options: RuntimeOptions | None = None) -> list[str]:
    """Runtimes whose packages are installed, e.g. ``["onnxruntime", "tvm"]`` (sorted).

    ``ethos-u`` counts only where the Ethos-U delegate library is present too (the one
    ``options`` names, else the BSP's).
    """
    delegates = (
        (options.ethos_u_delegate,)
        if options is not None and options.ethos_u_delegate
        else ETHOS_U_DELEGATE_PATHS
    )
    return sorted(
        name
        for name in _RUNTIME_PACKAGES
        if runtime_available(name) and (name != "ethos-u" or any(p.is_file() for p in delegates))
    )


@dataclass(frozen=True)
class RuntimeOptions:
    """Knobs of the runtimes.

    Attributes:
        num_threads: intra-op threads of ONNX Runtime and TFLite (None: the runtime's
            default) and of TVM's thread pool (None: ``TVM_NUM_THREADS`` if set, else every
            CPU this process may use; TVM's own default is half of them, pinned).
    """

    num_threads: int | None = None
    # The Ethos-U external delegate library (None: the BSP's, ETHOS_U_DELEGATE_PATHS).
    ethos_u_delegate: Path | None = None


def find_ethos_u_delegate(options: RuntimeOptions) -> Path:
    """The Ethos-U delegate library to load: the configured path, else the BSP's.

    Raises:
        NpuUnavailableError: no delegate library on this device (the NPU artifact is
            refused rather than run without its NPU part, which LiteRT cannot execute).
    """
    candidates = (options.ethos_u_delegate,) if options.ethos_u_delegate else ETHOS_U_DELEGATE_PATHS
    for path in candidates:
        if path.is_file():
            return path
    raise NpuUnavailableError(
        "this artifact runs on an Ethos-U NPU and the Ethos-U delegate library is not on "
        "this device (looked for " + ", ".join(str(p) for p in candidates) + "); it needs an "
        "Ethos-U NPU with its delegate (e.g. an i.MX93 with NXP's BSP): set the delegate path "
        "in the runtime options, or deploy an artifact of a CPU profile here"
    )


class _EthosUModel(_TfliteModel):
    """A Vela-compiled model: LiteRT with the Ethos-U external delegate, calls serialised."""

    def __init__(
        self, signature: Signature, model_path: Path, *, delegate: Path, num_threads: int | None
    ) -> None:
        LoadedModel.__init__(self, signature, runtime="ethos-u", thread_safe=False)
        try:
            from ai_edge_litert.interpreter import Interpreter, load_delegate
        except ImportError as err:
            raise RuntimeUnavailableError("ethos-u", str(err)) from err
        try:
            ethos_u = load_delegate(str(delegate))
            self._interp = Interpreter(
                model_path=str(model_path),
                experimental_delegates=[ethos_u],
                num_threads=num_threads,
            )
            self._interp.allocate_tensors()
        except Exception as err:
            raise ModelLoadError(
                f"LiteRT with the Ethos-U delegate {delegate} cannot load {model_path}: {err}"
            ) from err
        self._inputs = _match_details(self._interp.get_input_details(), signature.inputs)
        self._outputs = _match_details(self._interp.get_output_details(), signature.outputs)


def load(
    bundle_dir: Path, manifest: ArtifactManifest, *, options: RuntimeOptions | None = None
) -> LoadedModel:
    """Load a verified bundle's entry file with the runtime its manifest names.

    Call once per activation (never per request); verify the bundle first
    (``compiler.bundle.verify_bundle``).

    Args:
        bundle_dir: the bundle directory.
        manifest: its verified manifest.
        options: runtime knobs.

    Returns:
        The loaded model, ready for :meth:`LoadedModel.self_test` and :meth:`LoadedModel.infer`.

    Raises:
        RuntimeUnavailableError: the runtime's package is not installed.
        ModelLoadError: the entry file is missing or the runtime rejects it.
    """
    options = options or RuntimeOptions()
    runtime: RuntimeName = manifest.runtime
    if runtime not in _RUNTIME_PACKAGES:
        raise ModelLoadError(
            f"unknown runtime {runtime!r}; choose from: {', '.join(sorted(_RUNTIME_PACKAGES))}"
        )
    if not runtime_available(runtime):
        raise RuntimeUnavailableError(runtime)
    entry = bundle_dir / manifest.entry
    if not entry.is_file():
        raise ModelLoadError(f"entry file {manifest.entry!r} is missing from {bundle_dir}")
    signature = Signature.of(manifest)
    if runtime == "tvm":
        cuda_arch = (
            str(manifest.target.get("arch")) if manifest.target.get("kind") == "cuda" else None
        )
        return _TvmModel(signature, entry, num_threads=options.num_threads, cuda_arch=cuda_arch)
    if runtime == "onnxruntime":
        return _OrtModel(signature, entry, num_threads=options.num_threads)
    if runtime == "ethos-u":
        delegate = find_ethos_u_delegate(options)
        return _EthosUModel(signature, entry, delegate=delegate, num_threads=options.num_threads)
    return _TfliteModel(signature, entry, num_threads=options.num_threads)

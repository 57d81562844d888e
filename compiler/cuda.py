"""CUDA device code inside an artifact: compile it here with nvcc, and prove it is there.

TVM 0.27 on a machine without CUDA's runtime library leaves the generated kernels as CUDA
*source* in the exported library (module kind ``cuda``, format ``cuda``); the device would
compile them when it loads the library, through a Python callback and NVRTC or nvcc. A
shipped artifact must not need a CUDA compiler on the device, so the builder replaces that
source with a fatbin that nvcc builds here for the profile's arch (SASS for ``sm_XX`` plus
PTX for ``compute_XX``, so a newer GPU can still JIT the PTX with its driver).

Where the bytes live (both layouts written by tvm-ffi / TVM, documented in their sources:
``tvm_ffi/src/ffi/extra/library_module.cc`` and ``src/backend/cuda/runtime/cuda_module.cc``)::

    __tvm_ffi__library_bin = <nbytes u64> <indptr vec<u64>> <children vec<u64>>
                             { <kind str> [<payload str>] }*     ("_lib" has no payload)
    cuda payload           = <fmt str> <fmap> <code str>         (fmt: cuda|ptx|cubin|fatbin)
    str / vec              = <count u64 little endian> <items>

The format parsers here are hand-written because no library reads these containers: TVM
only deserializes them in C++ with the CUDA runtime loaded, which needs a GPU driver. They
are pure functions over bytes (table-tested); the TVM and nvcc adapters sit at the end.

The fatbin container (nvcc's ``--fatbin``, written uncompressed with ``--no-compress``)::

    header = <magic 0xBA55ED50 u32> <version u16> <header size u16> <payload size u64>
    entry  = <kind u16: 1 PTX, 2 ELF> <version u16> <header size u32> <payload size u64>
             ... <sm arch u32 at entry offset 28> ... <flags u64 at entry offset 40>

and each ELF entry is a cubin: ``e_machine`` EM_CUDA (190), the arch in ``e_flags`` bits 8-15.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import BuildFailedError, InvalidInputError, MissingDependencyError

LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"
FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_ELF = 1, 2
_FATBIN_COMPRESSED = 0x2000 | 0x8000  # flag bits nvcc sets on compressed entries
EM_CUDA = 190
# Formats the CUDA runtime loads without compiling anything (cuModuleLoadData).
BINARY_FORMATS = ("fatbin", "cubin")
NVCC_TIMEOUT_S = 600


class DeviceCodeError(InvalidInputError):
    """A library whose CUDA device code is missing, malformed or for the wrong arch."""


# ------------------------------------------------------------------ byte streams


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise DeviceCodeError(f"{self.what}: truncated at byte {self.pos}")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return int(value)

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DeviceCodeError(
                f"{self.what}: a field of {n} bytes at byte {self.pos} runs past the end "
                f"({len(self.data)} bytes)"
            )
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def string(self) -> bytes:
        return self.raw(self.u64())

    def u64_vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _u64_vec(values: list[int]) -> bytes:
    return struct.pack("<Q", len(values)) + b"".join(struct.pack("<Q", v) for v in values)


# ------------------------------------------------------------------ library bin


@dataclass
class LibraryBin:
    """The serialized import tree of a TVM library (``__tvm_ffi__library_bin``)."""

    indptr: list[int]
    children: list[int]
    # (kind, payload); payload is None for the "_lib" placeholder (the host code itself).
    modules: list[tuple[str, bytes | None]]

    def to_bytes(self) -> bytes:
        """Serialize, with the leading byte count."""
        body = _u64_vec(self.indptr) + _u64_vec(self.children)
        for kind, payload in self.modules:
            body += _str(kind.encode())
            if payload is not None:
                body += _str(payload)
        return struct.pack("<Q", len(body)) + body


def parse_library_bin(blob: bytes) -> LibraryBin:
    """Parse ``__tvm_ffi__library_bin`` bytes (trailing bytes past its count are ignored).

    Raises:
        DeviceCodeError: the bytes are not such a blob.
    """
    head = _Reader(blob, "library bin")
    nbytes = head.u64()
    reader = _Reader(head.raw(nbytes), "library bin")
    indptr, children = reader.u64_vec(), reader.u64_vec()
    if not indptr or indptr[0] != 0 or indptr[-1] != len(children):
        raise DeviceCodeError(f"library bin: import tree {indptr} does not fit {children}")
    modules: list[tuple[str, bytes | None]] = []
    for _ in range(len(indptr) - 1):
        kind = reader.string().decode("utf-8", errors="replace")
        modules.append((kind, None if kind == "_lib" else reader.string()))
    if reader.pos != len(reader.data):
        raise DeviceCodeError(
            f"library bin: {len(reader.data) - reader.pos} unread bytes after the modules"
        )
    return LibraryBin(indptr, children, modules)


@dataclass(frozen=True)
class CudaPayload:
    """A serialized CUDA module: format, function table (kept as bytes), code."""

    fmt: str
    fmap: bytes
    code: bytes
    kernels: tuple[str, ...]

    def to_bytes(self) -> bytes:
        """Serialize as ``[fmt][fmap][code]``."""
        return _str(self.fmt.encode()) + self.fmap + _str(self.code)


def _skip_function_info(reader: _Reader) -> None:
    # FunctionInfo: name, arg_types (4 bytes each), launch_param_tags, arg_extra_tags (i32).
    reader.string()
    reader.raw(4 * reader.u64())
    for _ in range(reader.u64()):
        reader.string()
    reader.raw(4 * reader.u64())


def parse_cuda_payload(payload: bytes) -> CudaPayload:
    """Split a ``cuda`` module payload into format, function table and code.

    Raises:
        DeviceCodeError: the payload does not have the ``[fmt][fmap][code]`` layout.
    """
    reader = _Reader(payload, "cuda module")
    fmt = reader.string().decode("utf-8", errors="replace")
    start = reader.pos
    kernels = []
    for _ in range(reader.u64()):
        kernels.append(reader.string().decode("utf-8", errors="replace"))
        _skip_function_info(reader)
    fmap = payload[start : reader.pos]
    code = reader.string()
    if reader.pos != len(payload):
        raise DeviceCodeError(
            f"cuda module: {len(payload) - reader.pos} bytes after the code; "
            "this TVM writes a layout edgeloop does not know"
        )
    return CudaPayload(fmt, fmap, code, tuple(kernels))


# ------------------------------------------------------------------ fatbin / cubin


@dataclass(frozen=True)
class DeviceImage:
    """One image in a fatbin (or a lone cubin): SASS for ``sm_XX`` or PTX for ``compute_XX``."""

    kind: str  # "sass" or "ptx"
    arch: str  # "sm_90" / "compute_90"
    size: int
    compressed: bool = False


def cubin_arch(cubin: bytes) -> str:
    """``sm_XX`` of a cubin (ELF EM_CUDA; arch in ``e_flags`` bits 8-15, CUDA 12+ ABI).

    Raises:
        DeviceCodeError: not a CUDA ELF.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(cubin))
        machine, flags = elf.header["e_machine"], int(elf.header["e_flags"])
    except (ELFError, struct.error) as err:
        raise DeviceCodeError(f"cubin is not an ELF file: {err}") from err
    if machine not in ("EM_CUDA", EM_CUDA):
        raise DeviceCodeError(f"cubin has e_machine {machine}; expected EM_CUDA")
    return f"sm_{(flags >> 8) & 0xFF}"


def fatbin_images(fatbin: bytes) -> list[DeviceImage]:
    """The images of an nvcc fatbin; ELF images' arch is read from the cubin itself.

    Raises:
        DeviceCodeError: not a fatbin, or an ELF image that is not a cubin.
    """
    if len(fatbin) < 16:
        raise DeviceCodeError(f"fatbin of {len(fatbin)} bytes is too short")
    magic, _version, header_size, size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != FATBIN_MAGIC:
        raise DeviceCodeError(f"fatbin magic is {magic:#x}; expected {FATBIN_MAGIC:#x}")
    end = min(len(fatbin), header_size + size)
    pos, images = header_size, []
    while pos + 48 <= end:
        kind, _ver, entry_header, payload_size = struct.unpack_from("<HHIQ", fatbin, pos)
        (sm,) = struct.unpack_from("<I", fatbin, pos + 28)
        (flags,) = struct.unpack_from("<Q", fatbin, pos + 40)
        body = fatbin[pos + entry_header : pos + entry_header + payload_size]
        compressed = bool(flags & _FATBIN_COMPRESSED)
        if kind == _FATBIN_ELF:
            arch = f"sm_{sm}" if compressed else cubin_arch(body)
            if arch != f"sm_{sm}":
                raise DeviceCodeError(f"fatbin entry says sm_{sm} but its cubin is {arch}")
            images.append(DeviceImage("sass", arch, payload_size, compressed))
        elif kind == _FATBIN_PTX:
            images.append(DeviceImage("ptx", f"compute_{sm}", payload_size, compressed))
        pos += entry_header + payload_size
    if not images:
        raise DeviceCodeError("fatbin holds no images")
    return images


def device_images(fmt: str, code: bytes) -> list[DeviceImage]:
    """Images of a CUDA module's code, by content (TVM labels any JIT binary "cubin")."""
    if code[:4] == struct.pack("<I", FATBIN_MAGIC):
        return fatbin_images(code)
    if code[:4] == b"\x7fELF":
        return [DeviceImage("sass", cubin_arch(code), len(code))]
    if fmt == "ptx":
        return [DeviceImage("ptx", "ptx", len(code))]
    return []


@dataclass
class DeviceCodeReport:
    """What CUDA code a library carries (``report.json`` → ``static_checks.device_code``)."""

    format: str | None
    sass_archs: list[str] = field(default_factory=list)
    ptx_archs: list[str] = field(default_factory=list)
    kernels: int = 0
    bytes: int = 0
    cuda_source: bool = False
    needs_compiler_at_load: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def inspect_library_bin(blob: bytes) -> DeviceCodeReport:
    """Summarize the CUDA modules in a library bin (pure)."""
    tree = parse_library_bin(blob)
    formats: set[str] = set()
    sass: set[str] = set()
    ptx: set[str] = set()
    kernels = size = 0
    source = False
    for kind, payload in tree.modules:
        if kind != "cuda" or payload is None:
            continue
        cuda = parse_cuda_payload(payload)
        formats.add(cuda.fmt)
        kernels += len(cuda.kernels)
        size += len(cuda.code)
        source = source or cuda.fmt not in (*BINARY_FORMATS, "ptx")
        for image in device_images(cuda.fmt, cuda.code):
            (sass if image.kind == "sass" else ptx).add(image.arch)
    return DeviceCodeReport(
        format="+".join(sorted(formats)) or None,
        sass_archs=sorted(sass),
        ptx_archs=sorted(ptx),
        kernels=kernels,
        bytes=size,
        cuda_source=source,
        needs_compiler_at_load=source,
    )


def check_device_code(report: DeviceCodeReport, arch: str) -> list[str]:
    """Problems of a library's device code for a profile's ``sm_XX`` arch (pure)."""
    problems = []
    if report.format is None:
        problems.append("the library holds no CUDA module")
        return problems
    if report.cuda_source:
        problems.append(
            f"the CUDA module is {report.format} source, compiled only when a device loads it"
        )
    if arch not in report.sass_archs:
        problems.append(
            f"no SASS for {arch} in the device code (it has: "
            f"{', '.join(report.sass_archs) or 'none'})"
        )
    return problems


def rewrite_cuda_modules(blob: bytes, compile_source: Callable[[str], bytes]) -> bytes:
    """Replace every CUDA-source module in a library bin by ``compile_source``'s fatbin (pure)."""
    tree = parse_library_bin(blob)
    modules: list[tuple[str, bytes | None]] = []
    for kind, payload in tree.modules:
        if kind == "cuda" and payload is not None:
            cuda = parse_cuda_payload(payload)
            if cuda.fmt == "cuda":
                fatbin = compile_source(cuda.code.decode("utf-8"))
                fatbin_images(fatbin)  # refuse to ship something that is not a fatbin
                payload = CudaPayload("fatbin", cuda.fmap, fatbin, cuda.kernels).to_bytes()
        modules.append((kind, payload))
    return LibraryBin(tree.indptr, tree.children, modules).to_bytes()


def library_bin_c_source(blob: bytes, symbol: str = LIBRARY_BIN_SYMBOL) -> str:
    """C source defining ``symbol`` as ``blob``, as TVM's ModulePackImportsToC writes it."""
    rows = [",".join(f"0x{b:02x}" for b in blob[i : i + 32]) + "," for i in range(0, len(blob), 32)]
    return (
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        f'__attribute__((visibility("default"))) extern const unsigned char {symbol}[];\n'
        f"const unsigned char {symbol}[{len(blob)}] = {{\n" + "\n".join(rows) + "\n};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )


# ------------------------------------------------------------------ adapters (nvcc, ELF, TVM)


def nvcc_gencode(arch: str) -> list[str]:
    """nvcc flags for SASS of ``sm_XX`` plus PTX of ``compute_XX``.

    Raises:
        DeviceCodeError: ``arch`` is not ``sm_`` followed by digits (and an optional letter).
    """
    number = arch.removeprefix("sm_")
    if not arch.startswith("sm_") or not number[:2].isdigit():
        raise DeviceCodeError(f"CUDA arch {arch!r} is not valid; expected e.g. sm_87 or sm_90")
    digits = number.rstrip("abf")
    return [
        "-gencode",
        f"arch=compute_{number},code=sm_{number}",
        "-gencode",
        f"arch=compute_{digits},code=compute_{digits}",
    ]


def find_nvcc() -> str:
    """Path of nvcc (PATH, then /usr/local/cuda/bin).

    Raises:
        MissingDependencyError: no nvcc.
    """
    found = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )
    if found is None:
        raise MissingDependencyError(
            "nvcc",
            hint="install the CUDA toolkit (nvcc) to build CUDA artifacts with device code",
        )
    return found


def nvcc_fatbin(source: str, arch: str, *, nvcc: str | None = None) -> bytes:
    """Compile CUDA source into an uncompressed fatbin for ``arch`` (SASS + PTX).

    Raises:
        MissingDependencyError: no nvcc.
        BuildFailedError: nvcc failed.
    """
    compiler = nvcc or find_nvcc()
    with tempfile.TemporaryDirectory(prefix="edgeloop-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source, encoding="utf-8")
        argv = [compiler, "--fatbin", "-O3", "-w", "--no-compress", *nvcc_gencode(arch)]
        try:
            proc = subprocess.run(
                [*argv, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
                timeout=NVCC_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as err:
            raise BuildFailedError(f"nvcc for {arch} timed out after {NVCC_TIMEOUT_S} s") from err
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise BuildFailedError(f"nvcc for {arch} failed ({proc.returncode}):\n{tail}")
        return out.read_bytes()


def nvcc_version(nvcc: str | None = None) -> str | None:
    """``release X.Y`` line of ``nvcc --version``, or None without nvcc."""
    try:
        out = subprocess.run(
            [nvcc or find_nvcc(), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (MissingDependencyError, OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else None


def read_library_bin(library: Path) -> bytes:
    """The ``__tvm_ffi__library_bin`` bytes of an exported shared library (pyelftools).

    Raises:
        DeviceCodeError: the library has no such symbol (a CPU-only library).
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with library.open("rb") as fh:
            elf = ELFFile(fh)
            for section in elf.iter_sections():
                if not isinstance(section, SymbolTableSection):
                    continue
                for sym in section.get_symbol_by_name(LIBRARY_BIN_SYMBOL) or []:
                    target = elf.get_section(sym["st_shndx"])
                    offset = sym["st_value"] - target["sh_addr"]
                    data: bytes = target.data()
                    return data[offset : offset + sym["st_size"]]
    except (ELFError, OSError) as err:
        raise DeviceCodeError(f"{library.name} is not a readable ELF library: {err}") from err
    raise DeviceCodeError(f"{library.name} has no {LIBRARY_BIN_SYMBOL}: no imported modules")


def inspect_library(library: Path) -> DeviceCodeReport:
    """What CUDA device code the shared library ``library`` carries."""
    return inspect_library_bin(read_library_bin(library))


@contextmanager
def nvcc_jit(arch: str) -> Iterator[None]:
    """Make TVM's build-time CUDA JIT (if any) produce our nvcc fatbin for ``arch``.

    Where TVM's CUDA plugin is loaded in the compiler's process (a machine with the driver),
    codegen compiles kernels at build time through ``tvm_callback_cuda_compile`` (NVRTC by
    default, for whatever arch it guesses). Registering this callback for the build keeps
    the artifact the same on every machine; the previous callback is restored afterwards.
    """
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    nvcc = find_nvcc()

    def compile_source(code: str, *_target: Any) -> bytes:
        return nvcc_fatbin(code, arch, nvcc=nvcc)

    tvm_ffi.register_global_func(name, compile_source, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


def install_nvcc_callback(arch: str) -> None:
    """Register the nvcc-fatbin ``tvm_callback_cuda_compile`` for ``arch`` in this process.

    The initializer of MetaSchedule's builder workers when tuning a CUDA target: each
    candidate is then compiled by the same nvcc, for the same arch, as the shipped artifact
    (TVM's own callback would pick NVRTC and guess the arch). Not undone: the workers are
    MetaSchedule's own processes.
    """
    import tvm_ffi

    nvcc = find_nvcc()

    def compile_source(code: str, *_target: Any) -> bytes:
        return nvcc_fatbin(code, arch, nvcc=nvcc)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def fatbin_packer(arch: str) -> Callable[[Any, bool, str, str], str]:
    """An ``fpack_imports`` for ``export_library`` that ships nvcc fatbins, not CUDA source.

    TVM serializes the import tree (``runtime.ModulePackImportsToTensor``); the CUDA modules
    in it are rewritten by :func:`rewrite_cuda_modules` and the result is written as C,
    which the (cross) compiler links in like TVM's own ``devc.c``.
    """

    def pack(mod: Any, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        from tvm.runtime import _ffi_api

        if is_system_lib:
            raise BuildFailedError("CUDA artifacts are not built as TVM system libraries")
        blob = bytes(_ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes())
        nvcc = find_nvcc()
        patched = rewrite_cuda_modules(blob, lambda src: nvcc_fatbin(src, arch, nvcc=nvcc))
        path = Path(workspace_dir) / f"{prefix}devc.c"
        path.write_text(library_bin_c_source(patched, f"{prefix}{LIBRARY_BIN_SYMBOL}"))
        return str(path)

    return pack

"""Model frontends: load ONNX, PyTorch (torch.export) and TFLite models for TVM Relax.

Each frontend does three things, importing its heavy library only when called:

* ``check_coverage``: list every operator TVM's frontend cannot import, with node names,
  *before* conversion (raises UnsupportedOperatorsError instead of a TVM stack trace);
* ``to_relax``: convert to a Relax IRModule with static input shapes and weights bound;
* ``reference``: run the source model in its own framework (ONNX Runtime for ONNX) to produce
  the outputs that the accuracy gate compares against.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from compiler.errors import (
    MissingDependencyError,
    ModelError,
    UnsupportedOperatorsError,
    UsageError,
)
from compiler.manifest import ModelFormat, TensorSpec

Arrays = list[npt.NDArray[Any]]
_SUFFIXES: dict[str, ModelFormat] = {
    ".onnx": "onnx",
    ".pt2": "torch",
    ".tflite": "tflite",
}


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or raise MissingDependencyError with the pip hint."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(module, extra) from err


def detect_format(path: Path) -> ModelFormat:
    """Model format from the file suffix.

    Raises:
        UsageError: unknown suffix (the message lists the supported ones).
    """
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"cannot tell the format of model {str(path)!r} from its suffix {path.suffix!r}; "
            f"supported: {', '.join(sorted(_SUFFIXES))}"
        )
    return fmt


def _fold_unsupported(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for op, node in pairs:
        found[op].append(node)
    return dict(found)


@dataclass
class SourceModel:
    """A loaded model with static input specs, ready for the compiler."""

    format: ModelFormat
    path: Path
    sha256: str
    inputs: list[TensorSpec]
    _handle: Any = field(repr=False)
    _reference: Callable[[Arrays], Arrays] | None = field(default=None, repr=False)
    output_names: list[str] = field(default_factory=list)

    def check_coverage(self) -> None:
        """Raise UnsupportedOperatorsError listing operators the TVM frontend cannot import."""
        if self.format == "onnx":
            pairs = _onnx_unsupported(self._handle)
            frontend = "ONNX"
        elif self.format == "torch":
            pairs = _torch_unsupported(self._handle)
            frontend = "PyTorch (torch.export)"
        else:
            pairs = _tflite_unsupported(self._handle)
            frontend = "TFLite"
        if pairs:
            raise UnsupportedOperatorsError(frontend, _fold_unsupported(pairs))

    def to_relax(self) -> Any:
        """Convert to a tvm.IRModule (weights bound as constants, static shapes)."""
        shapes = {t.name: t.shape for t in self.inputs}
        try:
            if self.format == "onnx":
                from tvm.relax.frontend.onnx import from_onnx

                return from_onnx(self._handle, shape_dict=shapes, keep_params_in_input=False)
            if self.format == "torch":
                from tvm.relax.frontend.torch import from_exported_program

                return from_exported_program(self._handle, keep_params_as_input=False)
            from tvm.relax.frontend.tflite import from_tflite

            dtypes = {t.name: t.dtype for t in self.inputs}
            return from_tflite(self._handle, shape_dict=shapes, dtype_dict=dtypes)
        except (UnsupportedOperatorsError, MissingDependencyError):
            raise
        except Exception as err:  # TVM raises many types; report them as a model problem
            raise ModelError(
                f"TVM's {self.format} frontend failed on {self.path.name}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err

    def reference(self, inputs: Arrays) -> Arrays:
        """Outputs of the source model in its own framework for one sample."""
        if self._reference is None:
            raise ModelError(f"no reference runtime for {self.format} models")
        return self._reference(inputs)

    def onnx_bytes(self) -> bytes | None:
        """The ONNX serialization (what ONNX Runtime would ship), when the source is ONNX."""
        if self.format == "onnx":
            return self.path.read_bytes()
        return None


def load_model(
    path: Path,
    *,
    input_shapes: Mapping[str, list[int]] | None = None,
    intra_op_threads: int | None = None,
) -> SourceModel:
    """Load a model file, resolving static input shapes.

    Raises:
        UsageError: unknown file suffix, or ``input_shapes`` names an input the model lacks.
        ModelError: the file cannot be read or an input shape stays dynamic.
        MissingDependencyError: the frontend's library is not installed.
    """
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist")
    fmt = detect_format(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    shapes = dict(input_shapes or {})
    if fmt == "onnx":
        return _load_onnx(path, digest, shapes, intra_op_threads)
    if fmt == "torch":
        return _load_torch(path, digest, shapes)
    return _load_tflite(path, digest, shapes)


def _resolve_shape(
    name: str, dims: Sequence[int | str | None], override: list[int] | None
) -> list[int]:
    if override is not None:
        if len(override) != len(dims):
            raise UsageError(
                f"--input-shape for {name!r} has rank {len(override)}; the model's input has "
                f"rank {len(dims)} ({'x'.join(str(d) for d in dims)})"
            )
        for given, declared in zip(override, dims, strict=True):
            if isinstance(declared, int) and declared > 0 and declared != given:
                raise UsageError(
                    f"--input-shape {name}:{'x'.join(map(str, override))} contradicts the "
                    f"model's static shape {'x'.join(str(d) for d in dims)}"
                )
        return list(override)
    if all(isinstance(d, int) and d > 0 for d in dims):
        return [int(d) for d in dims]  # type: ignore[arg-type]
    shown = "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
    suggested = "x".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in dims)
    raise ModelError(
        f"input {name!r} has a dynamic shape {shown}; give a static one with "
        f"--input-shape {name}:{suggested}"
    )


def _check_names(shapes: Mapping[str, list[int]], names: Sequence[str]) -> None:
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UsageError(
            f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; "
            f"the model's inputs are: {', '.join(names)}"
        )


# ---------------------------------------------------------------- ONNX


def _load_onnx(
    path: Path, digest: str, shapes: dict[str, list[int]], threads: int | None
) -> SourceModel:
    onnx = require("onnx", "compiler")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelError(f"{str(path)!r} is not a readable ONNX model: {err}") from err
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    _check_names(shapes, [i.name for i in graph_inputs])
    specs = []
    for value in graph_inputs:
        ttype = value.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in ttype.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        specs.append(
            TensorSpec(
                name=value.name,
                shape=_resolve_shape(value.name, dims, shapes.get(value.name)),
                dtype=dtype,
            )
        )

    session_holder: dict[str, Any] = {}

    def reference(inputs: Arrays) -> Arrays:
        if "s" not in session_holder:
            ort = require("onnxruntime", "compiler")
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session_holder["s"] = ort.InferenceSession(
                path.read_bytes(), options, providers=["CPUExecutionProvider"]
            )
        session = session_holder["s"]
        feeds = {spec.name: arr for spec, arr in zip(specs, inputs, strict=True)}
        return [np.asarray(o) for o in session.run(None, feeds)]

    return SourceModel(
        format="onnx",
        path=path,
        sha256=digest,
        inputs=specs,
        _handle=model,
        _reference=reference,
        output_names=[o.name for o in model.graph.output],
    )


def _onnx_unsupported(model: Any) -> list[tuple[str, str]]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"If", "Constant"}
    pairs: list[tuple[str, str]] = []

    def walk(graph: Any) -> None:
        for index, node in enumerate(graph.node):
            node_name = node.name or f"{node.op_type}_{index}"
            domain = node.domain or "ai.onnx"
            if domain not in ("ai.onnx", "ai.onnx.ml"):
                pairs.append((f"{domain}::{node.op_type}", node_name))
            elif node.op_type not in supported:
                pairs.append((node.op_type, node_name))
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return pairs


# ---------------------------------------------------------------- PyTorch (torch.export)


def _load_torch(path: Path, digest: str, shapes: dict[str, list[int]]) -> SourceModel:
    torch = require("torch", "torch")
    try:
        program = torch.export.load(str(path))
    except Exception as err:
        raise ModelError(f"{str(path)!r} is not a saved torch.export program: {err}") from err
    return from_exported_program(program, path=path, digest=digest, shapes=shapes)


def from_exported_program(
    program: Any, *, path: Path, digest: str, shapes: Mapping[str, list[int]] | None = None
) -> SourceModel:
    """Wrap a ``torch.export.ExportedProgram`` (static shapes are taken from its example inputs)."""
    torch = require("torch", "torch")
    program = program.run_decompositions()
    user_inputs = [
        spec for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"
    ]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for spec in user_inputs:
        name = spec.arg.name
        meta = placeholders[name].meta.get("val")
        if meta is None:
            raise ModelError(f"torch input {name!r} carries no example value; re-export it")
        dims: list[int | str | None] = [
            int(d) if isinstance(d, int) else str(d) for d in meta.shape
        ]
        dtype = str(meta.dtype).replace("torch.", "")
        override = (shapes or {}).get(name)
        specs.append(TensorSpec(name=name, shape=_resolve_shape(name, dims, override), dtype=dtype))
    _check_names(shapes or {}, [s.name for s in specs])
    module = program.module()

    def reference(inputs: Arrays) -> Arrays:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        if isinstance(result, (tuple, list)):
            return [r.detach().numpy() for r in result]
        return [result.detach().numpy()]

    return SourceModel(
        format="torch",
        path=path,
        sha256=digest,
        inputs=specs,
        _handle=program,
        _reference=reference,
    )


def save_torch_module(module: Any, example_inputs: tuple[Any, ...], path: Path) -> Path:
    """Export an ``nn.Module`` with example inputs via ``torch.export`` and save it as .pt2.

    The result is what ``edgeloop compile`` takes for PyTorch models; static shapes come from
    the example inputs.

    Raises:
        ModelError: torch.export cannot capture the module.
    """
    torch = require("torch", "torch")
    try:
        program = torch.export.export(module.eval(), example_inputs)
    except Exception as err:
        raise ModelError(f"torch.export could not capture {type(module).__name__}: {err}") from err
    torch.export.save(program, str(path))
    return path


def _torch_unsupported(program: Any) -> list[tuple[str, str]]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    supported = set(ExportedProgramImporter().create_convert_map())
    return [
        (node.target.__name__, node.name)
        for node in program.graph.nodes
        if node.op == "call_function" and node.target.__name__ not in supported
    ]


# ---------------------------------------------------------------- TFLite


# TensorType names (lower-cased) that TVM's TFLite frontend accepts as graph inputs and that
# numpy can hold; FLOAT64, STRING, COMPLEX* and the resource types are not among them.
_TFLITE_INPUT_DTYPES = frozenset(
    {"float32", "float16", "int8", "uint8", "int16", "int32", "uint32", "int64", "uint64", "bool"}
)


def _tflite_tensor_name(subgraph: Any, index: int) -> str:
    """Tensor name as TVM's ``get_tensor_name`` spells it (its shape_dict keys)."""
    name = subgraph.Tensors(index).Name()
    return name.decode("utf-8") if name is not None else f"tvmgen_tensor_{index}"


def _tflite_indices(table: Any, field: str) -> list[int]:
    """An int vector of a flatbuffer table (``*AsNumpy`` returns 0, not [], when it is empty)."""
    return [int(getattr(table, field)(i)) for i in range(getattr(table, f"{field}Length")())]


def _tflite_check_structure(model: Any) -> Any:
    """Walk subgraph 0 so a truncated or corrupt flatbuffer fails here, not deep inside TVM."""
    if model.SubgraphsLength() < 1:
        raise ValueError("the model has no subgraph")
    subgraph = model.Subgraphs(0)
    n_tensors, n_codes = subgraph.TensorsLength(), model.OperatorCodesLength()
    for kind in ("Inputs", "Outputs"):
        for t in _tflite_indices(subgraph, kind):
            if not 0 <= t < n_tensors:
                raise ValueError(f"graph {kind.lower()} refer to tensor {t} of {n_tensors}")
    for index in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(index)
        if not 0 <= op.OpcodeIndex() < n_codes:
            raise ValueError(f"operator {index} has opcode index {op.OpcodeIndex()} of {n_codes}")
        for t in _tflite_indices(op, "Inputs") + _tflite_indices(op, "Outputs"):
            if t >= n_tensors:  # -1 marks an omitted optional input
                raise ValueError(f"operator {index} refers to tensor {t} of {n_tensors}")
    for t in range(n_tensors):
        _tflite_tensor_name(subgraph, t)
    return subgraph


def _load_tflite(path: Path, digest: str, shapes: dict[str, list[int]]) -> SourceModel:
    tflite = require("tflite", "tflite")
    buf = path.read_bytes()
    try:
        if len(buf) < 8 or not tflite.Model.ModelBufferHasIdentifier(buf, 0):
            raise ValueError("no TFL3 file identifier")
        model = tflite.Model.GetRootAsModel(buf, 0)
        subgraph = _tflite_check_structure(model)
    except Exception as err:  # flatbuffers raises IndexError, struct.error, UnicodeDecodeError...
        raise ModelError(f"{str(path)!r} is not a readable TFLite model: {err}") from err
    type_names = {v: k.lower() for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
    input_indices = _tflite_indices(subgraph, "Inputs")
    names = [_tflite_tensor_name(subgraph, i) for i in input_indices]
    _check_names(shapes, names)
    specs = []
    for index, name in zip(input_indices, names, strict=True):
        tensor = subgraph.Tensors(index)
        dims: list[int | str | None] = [int(d) for d in _tflite_indices(tensor, "Shape")]
        signature = _tflite_indices(tensor, "ShapeSignature")
        if signature:  # -1 marks a dynamic dimension
            dims = [d if d > 0 else None for d in signature]
        dtype = type_names.get(tensor.Type(), f"type {tensor.Type()}")
        if dtype not in _TFLITE_INPUT_DTYPES:
            choices = ", ".join(sorted(t.upper() for t in _TFLITE_INPUT_DTYPES))
            raise ModelError(
                f"TFLite input {name!r} has tensor type {dtype.upper()}; TVM's TFLite frontend "
                f"takes inputs of type: {choices}"
            )
        shape = _resolve_shape(name, dims, shapes.get(name))
        specs.append(TensorSpec(name=name, shape=shape, dtype=dtype))
    output_indices = _tflite_indices(subgraph, "Outputs")
    interpreter_holder: dict[str, Any] = {}

    def reference(inputs: Arrays) -> Arrays:
        if "i" not in interpreter_holder:
            interpreter_holder["i"] = _tflite_interpreter(path, specs)
        interp = interpreter_holder["i"]
        # The interpreter's tensor indices are the model's, so match by index, not by order.
        by_index = dict(zip(input_indices, inputs, strict=True))
        for detail in interp.get_input_details():
            interp.set_tensor(
                detail["index"],
                np.ascontiguousarray(by_index[detail["index"]], dtype=detail["dtype"]),
            )
        interp.invoke()
        return [np.array(interp.get_tensor(i)) for i in output_indices]

    return SourceModel(
        format="tflite",
        path=path,
        sha256=digest,
        inputs=specs,
        _handle=model,
        _reference=reference,
        output_names=[_tflite_tensor_name(subgraph, i) for i in output_indices],
    )


def _tflite_interpreter(path: Path, specs: Sequence[TensorSpec]) -> Any:
    """A TFLite interpreter (LiteRT, else tflite-runtime) with inputs resized to ``specs``."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            interpreter_cls = importlib.import_module(module).Interpreter
        except ImportError:
            continue
        try:
            interp = interpreter_cls(model_path=str(path))
            # Pin dynamic (or overridden) input shapes to the static ones TVM compiles for.
            for detail, spec in zip(interp.get_input_details(), specs, strict=True):
                if list(detail["shape"]) != spec.shape:
                    interp.resize_tensor_input(detail["index"], spec.shape, strict=False)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"the TFLite interpreter cannot load {path.name}: {err}") from err
        return interp
    raise MissingDependencyError("ai_edge_litert", "tflite")


def _tflite_op_label(model: Any, op: Any) -> str:
    """Operator name for messages: the builtin name, ``CUSTOM:<code>`` or ``BUILTIN_<n>``."""
    tflite = require("tflite", "tflite")
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == tflite.BuiltinOperator.CUSTOM:
        custom = code.CustomCode()
        return f"CUSTOM:{custom.decode('utf-8', 'replace') if custom else '?'}"
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    return str(names.get(builtin, f"BUILTIN_{builtin}"))


def _tflite_unsupported(model: Any) -> list[tuple[str, str]]:
    """Operators of subgraph 0 that TVM's TFLite frontend would reject, with output tensor names.

    Uses the OperatorConverter that ``from_tflite`` builds, with the same tests as its
    ``check_unsupported_ops``: not in ``convert_map``, quantized but not in the quantized
    set, or dynamic-range quantized (float activations, quantized weights). Operators inside
    control-flow bodies (other subgraphs) are checked by TVM during conversion.
    """
    from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter

    converter = _tflite_operator_converter(model)
    subgraph = model.Subgraphs(0)
    pairs: list[tuple[str, str]] = []
    try:
        for index in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(index)
            outputs = _tflite_indices(op, "Outputs")
            has_output = bool(outputs) and outputs[0] >= 0
            node = _tflite_tensor_name(subgraph, outputs[0]) if has_output else f"op_{index}"
            try:
                op_name = converter.get_op_code_str(op)
            except NotImplementedError:  # custom operators and codes newer than its schema
                pairs.append((_tflite_op_label(model, op), node))
                continue
            if op_name not in converter.convert_map:
                pairs.append((op_name, node))
                continue
            ins = converter.get_input_tensors(op)
            quantized_in = any(t.qnn_params is not None for t in ins[:1])
            quantized_weights = any(t.qnn_params is not None for t in ins[1:])
            quantized_out = any(t.qnn_params is not None for t in converter.get_output_tensors(op))
            if quantized_weights and not (quantized_in or quantized_out):
                pairs.append((f"{op_name} (dynamic-range quantized)", node))
            elif (quantized_in or quantized_weights or quantized_out) and (
                op_name not in OperatorConverter._SUPPORTED_QUANTIZED_OPS
            ):
                pairs.append((f"{op_name} (quantized)", node))
    except (UnsupportedOperatorsError, MissingDependencyError):
        raise
    except Exception as err:  # a malformed operator or quantization table
        raise ModelError(f"TVM's TFLite frontend cannot read the model's operators: {err}") from err
    return pairs


def _tflite_operator_converter(model: Any) -> Any:
    """The OperatorConverter that ``from_tflite`` builds for subgraph 0 (its ``convert_map``).

    Built the way ``from_tflite`` builds it (model, subgraph, ExprTable, BlockBuilder); the
    constructor only indexes the schema's enums, so nothing is converted here.
    """
    from tvm import relax
    from tvm.relax.frontend.tflite.tflite_frontend import ExprTable, OperatorConverter

    return OperatorConverter(model, model.Subgraphs(0), ExprTable(), relax.BlockBuilder())

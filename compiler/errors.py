"""Exceptions of the compiler package, each carrying the CLI exit code it maps to.

Tree::

    CompilerError (exit 1, operational)
    ├── UsageError (exit 2): unknown profile, bad option value
    ├── InvalidInputError (exit 3): invalid profile file, model, artifact or key
    │   ├── ProfileError: a profile file that does not validate
    │   ├── ModelError: a model that cannot be read or whose shapes are unknown
    │   │   └── UnsupportedOperatorsError: operators the frontend cannot import
    │   └── ArtifactError: a bundle that is missing files, tampered or wrongly signed
    ├── BuildFailedError (exit 4): TVM build or cross-link failed
    │   └── AccuracyGateError: the artifact disagrees with the reference beyond tolerance
    └── MissingDependencyError (exit 5): an optional dependency is not installed

The CLI (``compiler.cli``) is the one place that turns these into exit codes.
"""

from __future__ import annotations

from collections.abc import Mapping


class CompilerError(Exception):
    """Root of every error the compiler raises on purpose."""

    exit_code = 1


class UsageError(CompilerError):
    """A command-line value that is not one of the allowed choices."""

    exit_code = 2


class InvalidInputError(CompilerError):
    """An input file (profile, model, artifact, key) that is invalid."""

    exit_code = 3


class ProfileError(InvalidInputError):
    """A hardware profile file that does not validate."""


class ModelError(InvalidInputError):
    """A model that cannot be loaded or prepared for compilation."""


class UnsupportedOperatorsError(ModelError):
    """The frontend cannot import some operators of the model."""

    def __init__(self, frontend: str, unsupported: Mapping[str, list[str]]) -> None:
        self.frontend = frontend
        self.unsupported = dict(unsupported)
        lines = [
            f"the {frontend} frontend of TVM cannot import {len(self.unsupported)} operator(s):"
        ]
        for op, nodes in sorted(self.unsupported.items()):
            shown = ", ".join(nodes[:5]) + (
                f", ... ({len(nodes) - 5} more)" if len(nodes) > 5 else ""
            )
            lines.append(f"  {op}: {len(nodes)} node(s): {shown}")
        super().__init__("\n".join(lines))


class ArtifactError(InvalidInputError):
    """An artifact bundle that is incomplete, tampered with, or wrongly signed."""


class BuildFailedError(CompilerError):
    """TVM compilation, tuning or cross-linking failed."""

    exit_code = 4


class AccuracyGateError(BuildFailedError):
    """The compiled artifact's outputs are outside the profile's tolerance."""


class MissingDependencyError(CompilerError):
    """An optional dependency is missing; the message says how to install it."""

    exit_code = 5

    def __init__(self, module: str, extra: str | None = None, *, hint: str | None = None) -> None:
        self.module = module
        self.extra = extra
        how = hint or f"install it with: pip install 'edgeloop[{extra}]'"
        kind = "tool" if hint else "Python package"
        super().__init__(f"the {kind} '{module}' is required for this; {how}")

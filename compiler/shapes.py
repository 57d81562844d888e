"""Parsing of ``--input-shape name:1x3x224x224`` options (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from compiler.errors import UsageError

_SHAPE_RE = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:x\d+)*)$")


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """Parse one ``NAME:D0xD1x...`` option (the name may contain colons, e.g. ``x:0``).

    Raises:
        UsageError: malformed text or a zero dimension.
    """
    match = _SHAPE_RE.match(text.strip())
    if not match:
        raise UsageError(
            f"--input-shape {text!r} is not NAME:DIMS with DIMS like 1x3x224x224 "
            "(positive integers joined by 'x')"
        )
    dims = [int(d) for d in match.group("dims").split("x")]
    if any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: every dimension must be a positive integer")
    return match.group("name"), dims


def parse_input_shapes(texts: Iterable[str]) -> dict[str, list[int]]:
    """Parse several options; a name given twice is an error."""
    shapes: dict[str, list[int]] = {}
    for text in texts:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise UsageError(f"--input-shape given twice for input {name!r}")
        shapes[name] = dims
    return shapes

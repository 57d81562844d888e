"""A faster ``inspect.stack`` for TVMScript parsing in tuning workers.

TVM's TVMScript parser calls ``inspect.stack()`` once per ``@T.prim_func``; the stdlib
version resolves every frame's module via ``inspect.getmodule`` (a scan of ``sys.modules``),
which makes importing ``tvm.s_tir.tensor_intrin`` take 40-120 s on a small CPU and kills
MetaSchedule builder workers at their timeout (docs/toolchain.md). This version reads the
same source lines straight from ``linecache`` and returns the same ``FrameInfo`` records.
No library offers this; it is the smallest fix that keeps TVM unmodified.
"""

from __future__ import annotations

import inspect
import linecache
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ORIGINAL_STACK = inspect.stack


def fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """Drop-in for ``inspect.stack`` that avoids ``inspect.getmodule``."""
    frame: Any = sys._getframe(1)
    infos = []
    while frame is not None:
        filename = frame.f_code.co_filename
        lineno = frame.f_lineno
        line = linecache.getline(filename, lineno, frame.f_globals) if context > 0 else ""
        infos.append(
            inspect.FrameInfo(
                frame,
                filename,
                lineno,
                frame.f_code.co_name,
                [line] if line else None,
                0 if line else None,
            )
        )
        frame = frame.f_back
    return infos


def install() -> None:
    """Replace ``inspect.stack`` process-wide (used as a builder worker initializer)."""
    inspect.stack = fast_stack


@contextmanager
def installed() -> Iterator[None]:
    """Use the fast version for the duration of a block, then restore the original."""
    previous = inspect.stack
    inspect.stack = fast_stack
    try:
        yield
    finally:
        inspect.stack = previous

"""The register-blocked GEMM tile of the TVMScript kernels vectorized along output channels
(``tvm_depthwise.depthwise_project_func``, ``tvm_split_block``, ``tvm_head``): the same
accumulator block as ``tvm_fusion.pointwise_func``'s te schedule, positions x vectors of 16
output channels, each step one weight vector per channel vector and one broadcast per
position."""

# TVMScript's buffer annotations are TVM IR, not Python types; its decorator is untyped.
# mypy: disable-error-code="valid-type,untyped-decorator,misc"

from __future__ import annotations

from typing import Any

from compiler.fusion_plan import LANES


def gemm_tile(positions: int, vectors: int, lanes: int = LANES) -> Any:
    """A TVMScript macro ``tile(acc, steps, weight, operand)``: ``acc[i, 0:vectors x lanes]``
    (a local (positions, vectors x lanes) buffer, registers once unrolled) = the sum over
    ``k < steps`` of ``weight(k, v)`` (the ``lanes`` lanes of channel vector v at step k)
    times ``operand(k, i)`` (position i's value at step k) broadcast; ``weight`` and
    ``operand`` are lambdas over the caller's buffers and loop variables."""
    from tvm.script import tirx as T

    @T.macro
    def tile(acc: Any, steps: Any, weight: Any, operand: Any) -> None:
        for i in T.unroll(positions):
            for v in T.unroll(vectors):
                with T.sblock("tile_init"):
                    acc[i, T.ramp(v * lanes, 1, lanes)] = T.broadcast(T.float32(0.0), lanes)
        for k in range(steps):
            for i in T.unroll(positions):
                for v in T.unroll(vectors):
                    with T.sblock("tile"):
                        acc[i, T.ramp(v * lanes, 1, lanes)] = acc[
                            i, T.ramp(v * lanes, 1, lanes)
                        ] + weight(k, v) * T.broadcast(operand(k, i), lanes)

    return tile


def position_gemm(count: int, positions: int, vectors: int, lanes: int = LANES) -> Any:
    """A TVMScript macro ``gemm(acc, steps, weight, operand, store)`` over ``count``
    positions in blocks of ``positions``, the ones that do not fill a block in one smaller
    last block: per block, ``gemm_tile``'s sums into ``acc`` with ``operand(k, p)`` the
    value of position p (counted from the first of the ``count``) at step k, then
    ``store(first, n)`` for the block's n positions from position ``first``. ``store`` is
    a lambda around the caller's write-back macro."""
    from tvm.script import tirx as T

    whole, rest = divmod(count, positions)
    tile = gemm_tile(positions, vectors, lanes)
    tail = gemm_tile(rest, vectors, lanes) if rest else None
    has_tail = rest > 0  # TVMScript: a bool

    @T.macro
    def gemm(acc: Any, steps: Any, weight: Any, operand: Any, store: Any) -> None:
        for t in range(whole):
            tile(acc, steps, weight, lambda k, i: operand(k, t * positions + i))
            store(t * positions, positions)
        if has_tail:
            tail(acc, steps, weight, lambda k, i: operand(k, whole * positions + i))
            store(whole * positions, rest)

    return gemm

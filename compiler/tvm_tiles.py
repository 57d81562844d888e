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


def position_tiles(
    count: int, positions: int, vectors: int, lanes: int = LANES
) -> tuple[int, int, Any, Any]:
    """``count`` positions in blocks of ``positions``: the number of whole blocks, the
    positions left over, the whole blocks' ``gemm_tile`` and the last block's (None where
    none are left over)."""
    whole, rest = divmod(count, positions)
    tail = gemm_tile(rest, vectors, lanes) if rest else None
    return whole, rest, gemm_tile(positions, vectors, lanes), tail

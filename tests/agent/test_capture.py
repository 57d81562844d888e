"""The capture policy (agent.capture) and its wire contract (agent.protocol), as tables."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.capture import (
    CaptureEvent,
    HookError,
    Sample,
    SampleStats,
    TokenBucket,
    decode_tensor,
    encode_sample,
    encode_tensor,
    load_hook,
    make_sample,
    run_hook,
    select,
    stats_of,
)
from agent.protocol import CapturePolicy, DesiredState, ProtocolError, SelectionRules

RULES = SelectionRules(
    low_confidence_below=0.5, high_entropy_above=0.9, shadow_disagreement=True, every_nth=10
)
ON = CapturePolicy(rules=RULES, sample_rate=0.1)


@pytest.mark.parametrize(
    ("stats", "policy", "nth", "draw", "expected"),
    [
        (SampleStats(confidence=0.3, entropy=0.95), ON, 1, 0.9, "low_confidence"),
        (SampleStats(confidence=0.6, entropy=0.95), ON, 1, 0.9, "high_entropy"),
        (SampleStats(confidence=0.5, entropy=0.9), ON, 1, 0.9, None),  # bounds are strict
        (SampleStats(confidence=0.9, shadow_disagreement=True), ON, 1, 0.9, "shadow_disagreement"),
        (SampleStats(confidence=0.9, shadow_disagreement=False), ON, 1, 0.9, None),
        (SampleStats(confidence=0.9), ON, 10, 0.9, "every_nth"),
        (SampleStats(confidence=0.9), ON, 20, 0.9, "every_nth"),
        (SampleStats(confidence=0.9), ON, 11, 0.9, None),
        (SampleStats(confidence=0.9), ON, 11, 0.05, "random"),
        (SampleStats(), ON, 3, 0.5, None),  # no confidence: only count and draw rules
        (SampleStats(), ON, 3, 0.0, "random"),
        (SampleStats(confidence=0.1), CapturePolicy(enabled=False, rules=RULES), 10, 0.0, None),
        (SampleStats(confidence=0.1), CapturePolicy(), 1, 0.5, None),  # no rule set
        (
            SampleStats(),
            CapturePolicy(rules=SelectionRules(every_nth=1)),
            7,
            0.99,
            "every_nth",
        ),
    ],
)
def test_select(
    stats: SampleStats, policy: CapturePolicy, nth: int, draw: float, expected: str | None
) -> None:
    assert select(stats, policy, nth=nth, draw=draw) == expected


@pytest.mark.parametrize(
    ("outputs", "top1", "low_conf"),
    [
        ([np.array([[10.0, 0.0, 0.0]], np.float32)], 0, False),
        ([np.array([[0.1, 0.2, 0.7]], np.float32)], 2, False),  # probabilities as they are
        ([np.array([[0.0, 0.0, 0.1]], np.float32)], 2, True),  # near-uniform logits
        ([np.array([[5.0, 0.0], [0.0, 0.1]], np.float32)], 1, True),  # least confident row
    ],
)
def test_stats_of(outputs: list[Any], top1: int, low_conf: bool) -> None:
    stats = stats_of(outputs, shadow_disagreement=True)
    assert stats.top1 == top1
    assert stats.confidence is not None and (stats.confidence < 0.6) == low_conf
    assert stats.entropy is not None and 0.0 <= stats.entropy <= 1.0
    assert stats.shadow_disagreement is True


@pytest.mark.parametrize(
    "outputs",
    [[], [np.array([1, 2], np.int64)], [np.array([[np.nan, 1.0]])], [np.array([[1.0]])]],
)
def test_stats_of_unusable_outputs(outputs: list[Any]) -> None:
    assert stats_of(outputs) == SampleStats()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_the_hourly_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3600, clock=clock)  # 1 byte/s, capacity 3600
    assert bucket.try_take(3000)
    assert not bucket.try_take(601)  # nothing taken on refusal
    assert bucket.try_take(600)
    assert not bucket.try_take(1)
    clock.t += 10
    assert bucket.available == pytest.approx(10)
    assert bucket.try_take(10)
    clock.t += 10 * 3600
    assert bucket.available == pytest.approx(3600)  # capped at one hour's budget


def test_zero_budget_admits_nothing() -> None:
    bucket = TokenBucket(0, clock=FakeClock())
    assert not bucket.try_take(1)
    assert bucket.try_take(0)


# ------------------------------------------------------------------ redaction hook


@pytest.fixture()
def hook_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("el_test_hooks")

    def keep(sample: Sample) -> Sample:
        return sample

    def blank(sample: Sample) -> Sample:
        return replace(sample, inputs=[np.zeros_like(a) for a in sample.inputs], sample_id="x")

    def drop(sample: Sample) -> None:
        return None

    def boom(sample: Sample) -> Sample:
        raise RuntimeError("hook bug")

    def wrong(sample: Sample) -> Any:
        return {"not": "a sample"}

    for f in (keep, blank, drop, boom, wrong):
        setattr(module, f.__name__, f)
    module.not_callable = 3  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def _sample() -> Sample:
    event = CaptureEvent(
        model="m",
        version="1",
        artifact_id="a" * 64,
        role="primary",
        inputs=[np.arange(4, dtype=np.float32).reshape(1, 4)],
        outputs=[np.array([[0.2, 0.8]], np.float32)],
        input_names=["x"],
        output_names=["y"],
    )
    return make_sample(event, stats_of(event.outputs), "low_confidence")


@pytest.mark.parametrize(
    ("name", "kept", "dropped"),
    [("keep", True, None), ("blank", True, None), ("drop", False, "redacted"),
     ("boom", False, "hook_error"), ("wrong", False, "hook_error")],
)  # fmt: skip
def test_run_hook(
    hook_module: types.ModuleType, name: str, kept: bool, dropped: str | None
) -> None:
    sample = _sample()
    out, reason = run_hook(load_hook(f"el_test_hooks:{name}"), sample)
    assert (out is not None) == kept
    assert reason == dropped
    if out is not None:
        assert out.sample_id == sample.sample_id  # the hook cannot change the id
    if name == "blank":
        assert out is not None and not out.inputs[0].any()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "is not of the form 'module:function'"),
        (":f", "is not of the form"),
        ("el_no_such_module_xyz:f", "cannot import 'el_no_such_module_xyz'"),
        ("el_test_hooks:missing", "has no 'missing'"),
        ("el_test_hooks:not_callable", "is not callable"),
    ],
)
def test_load_hook_errors_name_the_spec(
    hook_module: types.ModuleType, spec: str, message: str
) -> None:
    with pytest.raises(HookError, match=message) as err:
        load_hook(spec)
    assert repr(spec) in str(err.value)


def test_no_hook_keeps_the_sample() -> None:
    sample = _sample()
    assert run_hook(None, sample) == (sample, None)


# ------------------------------------------------------------------ wire forms


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([[1, -2]], dtype=np.int64),
        np.array([True, False]),
        np.arange(6, dtype=">f8").reshape(2, 3),  # big-endian input is sent little-endian
        np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2],  # not contiguous
    ],
)
def test_tensor_round_trip(array: np.ndarray[Any, Any]) -> None:
    tensor = encode_tensor(array, "t")
    back = decode_tensor(protocol.Tensor.model_validate_json(tensor.to_bytes()))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_tensor_with_wrong_byte_count_is_rejected() -> None:
    tensor = encode_tensor(np.zeros((2, 2), np.float32))
    bad = tensor.model_copy(update={"shape": [3, 2]})
    with pytest.raises(ValueError, match="has 16 bytes; float32 \\[3, 2\\] needs 24"):
        decode_tensor(bad)


def test_encoded_sample_is_a_captured_sample() -> None:
    sample = _sample()
    wire = protocol.decode(protocol.CapturedSample, encode_sample(sample, "dev-1"))
    assert wire.sample_id == sample.sample_id and len(wire.sample_id) == 32
    assert (wire.device_id, wire.model, wire.reason, wire.top1) == (
        "dev-1",
        "m",
        "low_confidence",
        1,
    )
    assert wire.inputs[0].name == "x" and wire.outputs[0].name == "y"
    np.testing.assert_array_equal(decode_tensor(wire.inputs[0]), sample.inputs[0])


def test_topics() -> None:
    assert protocol.desired("dev-1") == "edgeloop/v1/devices/dev-1/desired"
    assert protocol.capture_samples("dev-1") == "edgeloop/v1/devices/dev-1/capture/samples"
    assert protocol.capture_sketch("dev-1") == "edgeloop/v1/devices/dev-1/capture/sketch"
    with pytest.raises(ProtocolError, match="device id '../x' is invalid"):
        protocol.capture_samples("../x")


def _desired(**capture: Any) -> bytes:
    return json.dumps({"schema_version": 1, "revision": 3, "capture": capture}).encode()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "DesiredState payload is not JSON"),
        (b'{"schema_version": 2, "revision": 1}', "schema_version 2 is not supported"),
        (b'{"schema_version": 1}', "revision: Field required"),
        (_desired(when_full="drop_newest"), "capture.when_full"),
        (_desired(sample_rate=1.5), "capture.sample_rate"),
        (_desired(bytes_per_hour=-1), "capture.bytes_per_hour"),
        (_desired(max_sample_bytes=10**9), "capture.max_sample_bytes"),
        (_desired(rules={"every_nth": 0}), "capture.rules.every_nth"),
        (_desired(bogus=1), "capture.bogus: Extra inputs are not permitted"),
        (
            _desired(sketches={"m": {"reduction": {"input_shape": [2]}, "feature_edges": [[0, 1]],
                                     "num_classes": 2}}),
            "1 feature edge lists for 2 features",
        ),
    ],
)  # fmt: skip
def test_malformed_desired_state_is_refused_with_the_reason(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match="DesiredState") as err:
        protocol.decode(DesiredState, payload, max_bytes=protocol.MAX_DESIRED_PAYLOAD)
    assert message in str(err.value)


def test_desired_state_defaults_and_size_limit() -> None:
    desired = protocol.decode(DesiredState, _desired(), max_bytes=protocol.MAX_DESIRED_PAYLOAD)
    assert desired.capture is not None and desired.capture.when_full == "drop_oldest"
    assert protocol.decode(DesiredState, DesiredState(revision=1).to_bytes()).capture is None
    big = b" " * (protocol.MAX_DESIRED_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(DesiredState, big, max_bytes=protocol.MAX_DESIRED_PAYLOAD)


@pytest.mark.parametrize(
    ("hook", "ok"),
    [("pkg.mod:fn", True), ("mod:obj.method", True), ("mod", False), ("mod:", False),
     ("a b:c", False), (None, True)],
)  # fmt: skip
def test_capture_settings_check_the_hook_spec(hook: str | None, ok: bool) -> None:
    from pydantic import ValidationError

    from agent.config import CaptureSettings

    if ok:
        assert CaptureSettings(redaction_hook=hook).redaction_hook == hook
        return
    with pytest.raises(ValidationError, match="is not of the form 'module:function'") as err:
        CaptureSettings(redaction_hook=hook)
    assert repr(hook) in str(err.value)

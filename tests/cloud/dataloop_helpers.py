"""Helpers of the data loop's cloud tests: a real Mosquitto with the fleet's ACL, devices that
publish real ``SampleBatch``/``DriftSketch`` payloads, a registered model version with a
training baseline and a compile record, and an ingest consumer."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlmodel import Session

from agent import protocol
from agent.capture import encode_tensor
from agent.protocol import CapturedSample, DriftSketch, SampleBatch
from agent.sketches import SketchAccumulator
from cloud import crud, db
from cloud.baseline import TrainingBaseline, compute_baseline, save_baseline
from cloud.models import JobKind

PASSWORDS = {"fleet": "fleet-pw", "dev-a": "a-pw", "dev-b": "b-pw", "dev-c": "c-pw"}
CLASSES = ["a", "b", "c"]
N_FEATURES = 4
WEIGHTS = np.array(
    [[1.0, -0.5, 0.2], [0.3, 1.0, -0.4], [-0.6, 0.1, 1.0], [0.2, 0.2, 0.2]], dtype=np.float32
)


def logits(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The toy model: a fixed linear layer."""
    return np.asarray(x @ WEIGHTS, dtype=np.float32)


def training_inputs(n: int = 3000, seed: int = 0) -> npt.NDArray[np.float32]:
    """Standard normal inputs of the toy model."""
    return np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)


def make_baseline() -> TrainingBaseline:
    """The toy model's training baseline."""
    x = training_inputs()
    return compute_baseline(logits(x), x, logits(x).argmax(axis=1), CLASSES, reservoir_size=200)


def spec_sha(baseline: TrainingBaseline) -> str:
    """``spec_sha256`` as the agent computes it."""
    return hashlib.sha256(baseline.sketch.model_dump_json().encode()).hexdigest()


ARTIFACT = "ab" * 32


def register_model(
    url: str, root: Path, *, name: str = "toy", artifact_id: str = ARTIFACT
) -> tuple[TrainingBaseline, int]:
    """A dataset, a model version of ``name`` with the toy baseline, and a compile record
    mapping ``artifact_id`` to it; returns the baseline and the version's row id."""
    baseline = make_baseline()
    path = save_baseline(baseline, root / f"{name}-baseline.json")
    engine = db.make_engine(url)
    try:
        with Session(engine) as session:
            dataset, _ = crud.register_dataset(
                session,
                name=f"{name}-data",
                kind="npz",
                source="x.npz",
                digest="0" * 64,
                stored_path="x.npz",
                input_shape=[N_FEATURES],
                classes=CLASSES,
                n_samples=3000,
            )
            version = crud.register_version(
                session,
                model_name=name,
                metrics={"accuracy": 1.0},
                spec={},
                dataset_id=dataset.id or 0,
                training_job_id=None,
                code_version="test",
                parent_version_id=None,
                weights_path="w.pt",
                onnx_path="m.onnx",
                baseline_path=str(path),
                input_shape=[N_FEATURES],
                classes=CLASSES,
            )
            job = crud.enqueue_job(session, kind=JobKind.COMPILE, spec={}, max_attempts=1)
            crud.add_compile_record(
                session,
                model_version_id=version.id,
                job_id=job.id,
                profile="generic/x86_64",
                artifact_id=artifact_id,
            )
            session.commit()
            assert version.id is not None
            return baseline, version.id
    finally:
        engine.dispose()


# ---------------------------------------------------------------- payloads


def sample_batch(device: str, n: int, *, seed: int = 1) -> SampleBatch:
    """``n`` captured samples of the toy model from ``device``, as the agent sends them."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        x = rng.standard_normal((1, N_FEATURES)).astype(np.float32)
        y = logits(x)
        samples.append(
            CapturedSample(
                sample_id=rng.bytes(16).hex(),
                device_id=device,
                model="toy",
                version="1",
                artifact_id=ARTIFACT,
                ts=datetime.now(UTC),
                reason="random",
                top1=int(y.argmax()),
                confidence=0.5,
                entropy=0.5,
                inputs=[encode_tensor(x, "x")],
                outputs=[encode_tensor(y, "y")],
            )
        )
    return SampleBatch(device_id=device, samples=samples)


def sketch(
    device: str,
    baseline: TrainingBaseline,
    x: npt.NDArray[np.float32],
    *,
    artifact_id: str | None = ARTIFACT,
    sha: str | None = None,
    end: datetime | None = None,
) -> DriftSketch:
    """The drift sketch an agent would send after serving inputs ``x`` of the toy model."""
    acc = SketchAccumulator(baseline.sketch)
    acc.update(x, logits(x))
    end = end or datetime.now(UTC)
    return DriftSketch(
        sketch_id=np.random.default_rng().bytes(16).hex(),
        device_id=device,
        model="toy",
        version="1",
        artifact_id=artifact_id,
        spec_key="toy",
        spec_sha256=sha or spec_sha(baseline),
        window_start=end - timedelta(seconds=60),
        window_end=end,
        counts=acc.take(),
    )


# ---------------------------------------------------------------- broker and devices


@contextmanager
def mosquitto(root: Path) -> Iterator[Any]:
    """A real broker with the fleet's ACL and users fleet, dev-a, dev-b, dev-c."""
    pytest.importorskip("paho.mqtt.client")
    from fleet.broker import MosquittoProcess

    process = MosquittoProcess(root / "broker", users=dict(PASSWORDS))
    process.start()
    try:
        yield process
    finally:
        process.stop()


class Device:
    """A device's MQTT client (its own credentials, so the ACL applies)."""

    def __init__(self, port: int, device_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device_id = device_id
        self.received: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{device_id}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(device_id, PASSWORDS[device_id])
        self.client.on_message = lambda _c, _u, m: self.received.append(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected():
            assert time.monotonic() < deadline, f"{device_id} did not connect"
            time.sleep(0.02)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def send(self, message: SampleBatch | DriftSketch) -> None:
        """Publish a payload on the device's capture topic for its kind."""
        topic = (
            protocol.capture_samples(self.device_id)
            if isinstance(message, SampleBatch)
            else protocol.capture_sketch(self.device_id)
        )
        self.publish(topic, message.to_bytes())

    def subscribe(self, topic: str) -> None:
        """Subscribe at QoS 1 (retained messages arrive too)."""
        result, _ = self.client.subscribe(topic, qos=1)
        assert result == 0

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll until ``predicate`` holds or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

"""agent.server: the OIP v2 REST server over real compiled models, with a stock OIP client.

Correctness is checked against ONNX Runtime on the source ONNX file; ``tritonclient.http``
(the Triton project's client, not ours) checks protocol conformance, JSON and binary.
Wrappers (slow, negated) are small ``LoadedModel`` subclasses around the real models.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from agent.metrics import AgentMetrics, LatencyTracker, percentile
from agent.runtimes import Array, LoadedModel, Signature, load
from agent.server import (
    InferenceServer,
    ModelEntry,
    ModelRepository,
    ServedVersion,
    compare_outputs,
    unit_hash,
)
from compiler.manifest import TensorSpec
from tests.agent.test_runtimes import Artifacts, FakeModel, build_artifacts

EXPECTED = "expected input 'input' FP32 [1,3,16,16]"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    import tvm  # the compiler library first (see test_runtimes.full_tvm)

    assert not tvm.base._RUNTIME_ONLY
    return build_artifacts(tmp_path_factory)


@pytest.fixture(scope="session")
def cnn(artifacts: Artifacts) -> dict[str, ServedVersion]:
    """The cnn model loaded once per runtime: tvm is version 1, onnxruntime version 2."""
    served = {}
    for runtime in ("tvm", "onnxruntime"):
        b = artifacts.bundles[("cnn", runtime)]
        served[runtime] = ServedVersion(
            b.manifest.model.version, load(b.path, b.manifest), b.artifact_id
        )
    return served


class Wrapped(LoadedModel):
    """A real model with a delay before it runs and a transform of its outputs."""

    def __init__(
        self,
        inner: LoadedModel,
        *,
        delay_s: float = 0.0,
        transform: Callable[[Array], Array] | None = None,
    ) -> None:
        super().__init__(inner.signature, runtime=inner.runtime, thread_safe=True)
        self.inner, self.delay_s, self.transform = inner, delay_s, transform
        self.started = threading.Event()

    def _run(self, inputs: list[Array]) -> list[Array]:
        self.started.set()
        time.sleep(self.delay_s)
        outputs = self.inner.infer(inputs)
        return [self.transform(o) for o in outputs] if self.transform else outputs


@pytest.fixture()
def serve() -> Iterator[Callable[..., InferenceServer]]:
    """Start servers on free ports; stop them after the test."""
    started: list[InferenceServer] = []

    def start(repo: ModelRepository, **kwargs: Any) -> InferenceServer:
        server = InferenceServer(repo, **kwargs)
        server.start("127.0.0.1", 0)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout_s=5)


class Client:
    """A keep-alive JSON client on http.client."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.last_body = b""

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=headers or {})
        response = self.conn.getresponse()
        raw = self.last_body = response.read()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, (json.loads(raw) if is_json and raw else {}), response

    def infer(self, model: str, x: Array, **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ],
            **extra,
        }
        status, payload, _ = self.request("POST", f"/v2/models/{model}/infer", body)
        return status, payload


def _x(seed: int) -> Array:
    return np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)


def _logits(payload: dict[str, Any]) -> Array:
    (out,) = payload["outputs"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _repo(entry: ModelEntry, **kwargs: Any) -> ModelRepository:
    repo = ModelRepository(**kwargs)
    repo.set("cnn", entry)
    return repo


# ------------------------------------------------------------------ health and metadata

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
def test_health_metadata_and_ready(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    repo = ModelRepository()
    repo.register("cnn")
    server = serve(repo)
    c = Client(server.port)
    assert c.request("GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert c.request("GET", "/v2/health/ready")[:2] == (503, {"ready": False})
    assert c.request("GET", "/v2/models/cnn/ready")[0] == 503
    assert c.request("POST", "/v2/models/cnn/infer", {"inputs": []})[0] == 503
    repo.set("cnn", ModelEntry(primary=cnn["tvm"], shadow=cnn["onnxruntime"]))
    assert c.request("GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    assert c.request("GET", "/v2/models/cnn/ready")[:2] == (200, {"name": "cnn", "ready": True})
    assert c.request("GET", "/v2/models/cnn/versions/2/ready")[0] == 200
    assert c.request("GET", "/v2/models/cnn/versions/9/ready")[0] == 404
    assert c.request("GET", "/v2/models/nope/ready")[0] == 404

    status, meta, _ = c.request("GET", "/v2")
    assert status == 200 and meta["name"] == "edgeloop-agent"
    assert "binary_tensor_data" in meta["extensions"]
    status, meta, _ = c.request("GET", "/v2/models/cnn")
    assert status == 200
    assert meta == {
        "name": "cnn",
        "versions": ["1", "2"],
        "platform": "tvm_relax_vm",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10]}],
    }
    status, meta, _ = c.request("GET", "/v2/models/cnn/versions/2")
    assert status == 200 and meta["versions"] == ["2"] and meta["platform"] == "onnxruntime_onnx"
    status, err, _ = c.request("GET", "/v2/models/cnn/versions/7")
    assert status == 404 and err == {
        "error": "model 'cnn' has no version '7'; served versions: 1, 2"
    }
    status, err, _ = c.request("GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'; served models: cnn" in err["error"]
    assert c.request("GET", "/v2/nothing/here")[0] == 404
    status, err, response = c.request("GET", "/v2/models/cnn/infer")
    assert status == 405 and response.getheader("Allow") == "POST"


# ------------------------------------------------------------------ inference


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_json_inference_matches_onnxruntime(
    runtime: str,
    artifacts: Artifacts,
    cnn: dict[str, ServedVersion],
    serve: Callable[..., InferenceServer],
) -> None:
    server = serve(_repo(ModelEntry(primary=cnn[runtime])))
    c = Client(server.port)
    for seed in range(3):
        x = _x(seed)
        status, payload = c.infer("cnn", x, id=f"req-{seed}")
        assert status == 200, payload
        assert payload["model_name"] == "cnn"
        assert payload["model_version"] == cnn[runtime].version
        assert payload["id"] == f"req-{seed}"
        assert payload["outputs"][0]["datatype"] == "FP32"
        np.testing.assert_allclose(
            _logits(payload), artifacts.reference("cnn", x), atol=1e-5, rtol=1e-5
        )
    # nested data, an explicit output filter and the versioned path
    x = _x(9)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": x.tolist()}
        ],
        "outputs": [{"name": "logits"}],
    }
    version = cnn[runtime].version
    status, payload, _ = c.request("POST", f"/v2/models/cnn/versions/{version}/infer", body)
    assert status == 200 and "id" not in payload
    np.testing.assert_allclose(_logits(payload), artifacts.reference("cnn", x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("binary_in", "binary_out"),
    [(False, False), (True, True), (True, False), (False, True), (True, None)],
    ids=["json", "binary", "binary-in", "binary-out", "default-outputs"],
)
def test_tritonclient_gets_correct_outputs(
    binary_in: bool,
    binary_out: bool | None,
    artifacts: Artifacts,
    cnn: dict[str, ServedVersion],
    serve: Callable[..., InferenceServer],
) -> None:
    import tritonclient.http as triton

    server = serve(_repo(ModelEntry(primary=cnn["tvm"])))
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=10)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("cnn")
        meta = client.get_model_metadata("cnn")
        assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16]}
        for seed in range(3):
            x = _x(seed)
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary_in)
            outputs = (
                None
                if binary_out is None
                else [triton.InferRequestedOutput("logits", binary_data=binary_out)]
            )
            result = client.infer("cnn", [tensor], outputs=outputs, request_id=f"r{seed}")
            assert result.get_response()["id"] == f"r{seed}"
            out = result.as_numpy("logits")
            assert out is not None and out.dtype == np.float32 and out.shape == (1, 10)
            np.testing.assert_allclose(out, artifacts.reference("cnn", x), atol=1e-5, rtol=1e-5)
    finally:
        client.close()


@pytest.mark.slow
def test_tritonclient_sees_protocol_errors(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    server = serve(_repo(ModelEntry(primary=cnn["onnxruntime"])))
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        tensor = triton.InferInput("input", [1, 3, 16, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 16, 8), np.float32))
        with pytest.raises(InferenceServerException, match=EXPECTED.replace("[", r"\[")):
            client.infer("cnn", [tensor])
        with pytest.raises(InferenceServerException, match="unknown model 'other'"):
            client.infer("other", [tensor])
    finally:
        client.close()


def _body(name: str = "input", shape: Any = None, datatype: str = "FP32", data: Any = None) -> Any:
    shape = [1, 3, 16, 16] if shape is None else shape
    count = int(np.prod(shape))
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape,
                "datatype": datatype,
                "data": [0.5] * count if data is None else data,
            }
        ]
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body(shape=[1, 3, 16, 8]), f"input 'input' has shape [1,3,16,8]; {EXPECTED}"),
        (_body(datatype="INT64"), f"input 'input' has datatype INT64; {EXPECTED}"),
        (_body(name="image"), f"model 'cnn' has no input 'image'; {EXPECTED}"),
        ({"inputs": []}, f"missing input(s) 'input'; {EXPECTED}"),
        (_body(data=[1.0, 2.0]), "input 'input' has 2 values where shape [1,3,16,16] needs"),
        (_body(data=["a"] * 768), "data is not 768 FP32 values"),
        ({"inputs": [{"name": "input"}]}, "invalid inference request: inputs.0.shape: Field"),
        (b"{not json", "invalid inference request"),
        (
            {**_body(), "outputs": [{"name": "probs"}]},
            "model 'cnn' has no output 'probs'; expected output 'logits' FP32 [1,10]",
        ),
    ],
    ids=["shape", "dtype", "name", "missing", "count", "strings", "schema", "json", "output"],
)
def test_bad_requests_get_400_with_the_expected_signature(
    body: Any,
    message: str,
    cnn: dict[str, ServedVersion],
    serve: Callable[..., InferenceServer],
) -> None:
    server = serve(_repo(ModelEntry(primary=cnn["tvm"])))
    status, payload, _ = Client(server.port).request("POST", "/v2/models/cnn/infer", body)
    assert status == 400
    assert message in payload["error"]
    text = server.metrics.render()[0].decode()
    assert 'edgeloop_inference_errors_total{model="cnn",reason="invalid",role="primary",' in text


@pytest.mark.slow
def test_binary_request_with_wrong_sizes_is_400(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    server = serve(_repo(ModelEntry(primary=cnn["tvm"])))
    c = Client(server.port)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 16, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 3072},
                }
            ]
        }
    ).encode()
    raw = np.zeros(768, np.float32).tobytes()
    hdr = {"Inference-Header-Content-Length": str(len(header))}
    assert c.request("POST", "/v2/models/cnn/infer", header + raw, hdr)[0] == 200
    status, err, _ = c.request("POST", "/v2/models/cnn/infer", header + raw[:-4], hdr)
    assert status == 400 and "needs 3072 bytes of binary data" in err["error"]
    status, err, _ = c.request("POST", "/v2/models/cnn/infer", header + raw + b"xx", hdr)
    assert status == 400 and "3074 bytes of binary data, the inputs use 3072" in err["error"]
    status, err, _ = c.request(
        "POST", "/v2/models/cnn/infer", header + raw, {"Inference-Header-Content-Length": "9999"}
    )
    assert status == 400 and "is not a length within" in err["error"]


def test_unknown_model_is_404_and_not_counted(serve: Callable[..., InferenceServer]) -> None:
    server = serve(ModelRepository())
    status, err, _ = Client(server.port).request("POST", "/v2/models/ghost/infer", _body())
    assert status == 404 and err == {"error": "unknown model 'ghost'; served models: none"}
    assert "ghost" not in server.metrics.render()[0].decode()


# ------------------------------------------------------------------ overload, A/B, shadow, swap


@pytest.mark.slow
def test_overload_answers_503(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    slow = ServedVersion("1", Wrapped(cnn["onnxruntime"].model, delay_s=0.4))
    server = serve(_repo(ModelEntry(primary=slow), max_concurrency=1, queue_timeout_s=0.02))
    results: list[tuple[int, dict[str, Any]]] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        client = Client(server.port)
        barrier.wait(5)
        results.append(client.infer("cnn", _x(0)))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 503]
    busy = next(payload for status, payload in results if status == 503)
    assert "model 'cnn' is overloaded: 1 inference(s) already running" in busy["error"]
    text = server.metrics.render()[0].decode()
    assert 'reason="busy"' in text


@pytest.mark.slow
def test_ab_split_is_roughly_honoured_and_sticky_per_id(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    entry = ModelEntry(primary=cnn["tvm"], candidate=cnn["onnxruntime"], candidate_fraction=0.25)
    server = serve(_repo(entry, seed=1))
    c = Client(server.port)
    x = _x(1)
    random_split = [c.infer("cnn", x)[1]["model_version"] for _ in range(200)]
    assert 25 <= random_split.count("2") <= 75  # expected 50; binomial sd ~6
    by_id = {f"user-{i}": c.infer("cnn", x, id=f"user-{i}")[1]["model_version"] for i in range(200)}
    assert 25 <= list(by_id.values()).count("2") <= 75
    for request_id, version in list(by_id.items())[:20]:  # deterministic per request id
        assert c.infer("cnn", x, id=request_id)[1]["model_version"] == version
        assert version == ("2" if unit_hash("cnn", request_id) < 0.25 else "1")
    # an explicit version bypasses the split
    status, payload, _ = c.request("POST", "/v2/models/cnn/versions/2/infer", _body())
    assert status == 200 and payload["model_version"] == "2"
    text = server.metrics.render()[0].decode()
    assert 'edgeloop_inference_requests_total{model="cnn",role="candidate",version="2"}' in text


@pytest.mark.slow
def test_shadow_never_answers_and_disagreement_is_recorded(
    artifacts: Artifacts, cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    negated = ServedVersion("9", Wrapped(cnn["onnxruntime"].model, transform=lambda a: -a))
    repo = _repo(ModelEntry(primary=cnn["tvm"], shadow=negated))
    server = serve(repo, shadow_queue=16)
    c = Client(server.port)
    for seed in range(5):
        x = _x(seed)
        status, payload = c.infer("cnn", x)
        assert status == 200 and payload["model_version"] == "1"
        np.testing.assert_allclose(_logits(payload), artifacts.reference("cnn", x), atol=1e-5)
    assert server.wait_shadow_idle(10)
    snap = repo.stats("cnn").shadow.snapshot()
    assert snap.comparisons == 5 and snap.top1_disagreements == 5 and snap.errors == 0
    assert snap.mean_top1_agreement == 0.0
    assert snap.max_abs_diff is not None and snap.max_abs_diff > 0.1
    text = server.metrics.render()[0].decode()
    labels = '{model="cnn",primary_version="1",shadow_version="9"}'
    assert f"edgeloop_shadow_top1_disagreements_total{labels} 5.0" in text
    assert f"edgeloop_shadow_comparisons_total{labels} 5.0" in text
    # an agreeing shadow: the same network in the other runtime
    repo.set("cnn", ModelEntry(primary=cnn["tvm"], shadow=cnn["onnxruntime"]))
    for seed in range(3):
        assert c.infer("cnn", _x(seed))[0] == 200
    assert server.wait_shadow_idle(10)
    snap = repo.stats("cnn").shadow.snapshot()
    assert snap.comparisons == 8 and snap.top1_disagreements == 5
    assert snap.last_max_abs_diff is not None and snap.last_max_abs_diff < 1e-4


@pytest.mark.slow
def test_busy_shadow_is_dropped_not_waited_for(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    slow_shadow = ServedVersion("9", Wrapped(cnn["onnxruntime"].model, delay_s=1.0))
    repo = _repo(ModelEntry(primary=cnn["tvm"], shadow=slow_shadow))
    server = serve(repo, shadow_workers=1, shadow_queue=0)
    c = Client(server.port)
    start = time.monotonic()
    for seed in range(4):
        assert c.infer("cnn", _x(seed))[0] == 200
    assert time.monotonic() - start < 0.9  # the primary never waits for the shadow
    assert server.wait_shadow_idle(10)
    snap = repo.stats("cnn").shadow.snapshot()
    assert snap.dropped == 3 and snap.comparisons == 1
    assert 'edgeloop_shadow_dropped_total{model="cnn"} 3.0' in server.metrics.render()[0].decode()


@pytest.mark.slow
def test_swapping_versions_under_load_never_fails_a_request(
    artifacts: Artifacts, cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    repo = _repo(ModelEntry(primary=cnn["tvm"]), max_concurrency=8, queue_timeout_s=5)
    server = serve(repo)
    x = _x(4)
    expected = artifacts.reference("cnn", x)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def hammer() -> None:
        client = Client(server.port)
        while not stop.is_set():
            status, payload = client.infer("cnn", x)
            if status != 200:
                failures.append(f"{status} {payload}")
            elif not np.allclose(_logits(payload), expected, atol=1e-5):
                failures.append(f"wrong output from version {payload['model_version']}")
            else:
                seen.append(payload["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(40):
        repo.set("cnn", ModelEntry(primary=cnn["onnxruntime" if i % 2 else "tvm"]))
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(10)
    assert not failures
    assert {"1", "2"} <= set(seen)


@pytest.mark.slow
def test_request_started_on_old_version_finishes_on_it(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    wrapped = Wrapped(cnn["tvm"].model, delay_s=0.3)
    old = ServedVersion("1", wrapped)
    repo = _repo(ModelEntry(primary=old))
    server = serve(repo)
    result: list[tuple[int, dict[str, Any]]] = []
    slow = threading.Thread(target=lambda: result.append(Client(server.port).infer("cnn", _x(0))))
    slow.start()
    assert wrapped.started.wait(5)  # the request is running on version 1
    previous = repo.set("cnn", ModelEntry(primary=cnn["onnxruntime"]))
    assert previous is not None and previous.primary is old
    status, payload = Client(server.port).infer("cnn", _x(0))
    assert status == 200 and payload["model_version"] == "2"
    slow.join(5)
    assert result and result[0][0] == 200 and result[0][1]["model_version"] == "1"


@pytest.mark.slow
def test_metrics_endpoint_serves_the_counters(
    cnn: dict[str, ServedVersion], serve: Callable[..., InferenceServer]
) -> None:
    metrics = AgentMetrics()
    metrics.set_active_model("cnn", version="1", artifact_id="ab" * 32, runtime="tvm")
    metrics.job_state("SUCCEEDED")
    metrics.transfer_chunk(1024)
    server = serve(_repo(ModelEntry(primary=cnn["tvm"])), metrics=metrics)
    c = Client(server.port)
    for seed in range(3):
        assert c.infer("cnn", _x(seed))[0] == 200
    status, _, response = c.request("GET", "/metrics")
    assert status == 200 and response.getheader("Content-Type", "").startswith("text/plain")
    text = c.last_body.decode()
    for line in [
        'edgeloop_inference_requests_total{model="cnn",role="primary",version="1"} 3.0',
        'edgeloop_inference_latency_seconds_bucket{le="0.0005",model="cnn",role="primary",'
        'version="1"}',
        'edgeloop_inference_latency_seconds_count{model="cnn",role="primary",version="1"} 3.0',
        'edgeloop_job_state_transitions_total{state="SUCCEEDED"} 1.0',
        "edgeloop_transfer_bytes_total 1024.0",
        'edgeloop_active_model_info{artifact_id="' + "ab" * 32 + '",model="cnn",role="primary",'
        'runtime="tvm",version="1"} 1.0',
    ]:
        assert line in text, line
    summary = server.repository.latency()["cnn"]
    assert summary.count == 3 and summary.p50_ms is not None and summary.p50_ms > 0


# ------------------------------------------------------------------ the repository, no HTTP


def _fake(version: str, signature: Signature | None = None) -> ServedVersion:
    sig = signature or Signature(
        inputs=(TensorSpec(name="x", shape=[1, 4], dtype="float32"),),
        outputs=(TensorSpec(name="y", shape=[1, 3], dtype="float32"),),
    )
    return ServedVersion(version, FakeModel(lambda xs: [xs[0][:, :3] * 2], sig), f"id-{version}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidate": "1", "candidate_fraction": 0.5}, "served versions must be distinct"),
        ({"candidate": "2", "candidate_fraction": 1.5}, "candidate_fraction 1.5 is not in"),
        ({"shadow": "other-inputs"}, "shadow version 'other-inputs' takes other inputs"),
    ],
)
def test_model_entry_validation(kwargs: dict[str, Any], message: str) -> None:
    other = Signature(inputs=(TensorSpec(name="z", shape=[2], dtype="int64"),), outputs=())
    members = {
        k: _fake(v, other if v == "other-inputs" else None)
        for k, v in kwargs.items()
        if k in ("candidate", "shadow")
    }
    fraction = kwargs.get("candidate_fraction", 0.0)
    with pytest.raises(ValueError, match=message):
        ModelEntry(primary=_fake("1"), candidate_fraction=fraction, **members)


def test_repository_daemon_view() -> None:
    repo = ModelRepository()
    repo.register("m")
    assert not repo.ready() and repo.loaded() == []
    repo.set_model("m", "1", "id-1", "fake", _fake("1").model)
    repo.set("m", ModelEntry(primary=repo.get("m").primary, shadow=_fake("s")))
    repo.set_model("m", "2", "id-2", "fake", _fake("2").model)  # keeps the shadow
    assert repo.ready()
    assert [(m.version, m.role, m.artifact_id) for m in repo.loaded()] == [
        ("2", "primary", "id-2"),
        ("s", "shadow", "id-s"),
    ]
    (out,) = repo.infer("m", [np.ones((1, 4), np.float32)])
    assert out.tolist() == [[2.0, 2.0, 2.0]]
    assert repo.latency()["m"].count == 1
    repo.remove_model("m")
    assert repo.names() == []


@pytest.mark.parametrize(
    ("primary", "shadow", "diff", "top1"),
    [
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], 0.0, 1.0),
        ([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[1.0, 2.5, 3.0], [1.0, 2.0, 3.0]], 2.0, 0.5),
        ([[0.2]], [[0.7]], 0.5, None),  # one class: no top-1
    ],
)
def test_compare_outputs(
    primary: list[list[float]], shadow: list[list[float]], diff: float, top1: float | None
) -> None:
    got = compare_outputs([np.array(primary, np.float32)], [np.array(shadow, np.float32)])
    assert got[0] == pytest.approx(diff) and got[1] == top1


def test_compare_outputs_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([np.zeros((1, 3))], [np.zeros((1, 4))])


def test_latency_tracker_window_and_percentiles() -> None:
    now = [0.0]
    tracker = LatencyTracker(window_s=10.0, clock=lambda: now[0])
    assert tracker.summary().p50_ms is None
    for ms in range(1, 101):
        tracker.observe(float(ms))
    tracker.error()
    s = tracker.summary()
    assert (s.count, s.errors, s.p50_ms, s.p95_ms, s.p99_ms) == (100, 1, 50.0, 95.0, 99.0)
    now[0] = 11.0
    tracker.observe(7.0)
    s = tracker.summary()
    assert (s.count, s.errors, s.p50_ms) == (1, 0, 7.0)
    assert percentile([1.0, 2.0], 100) == 2.0


def test_metrics_use_a_private_registry() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.observe_inference("m", "1", role="primary", seconds=0.001)
    assert b"edgeloop_inference_requests_total{" not in b.render()[0]
    a.set_active_model("m", version="1", artifact_id="x", runtime="tvm")
    a.set_active_model("m", version="2", artifact_id="y", runtime="tvm")
    text = a.render()[0].decode()
    assert 'version="2"' in text and 'artifact_id="x"' not in text

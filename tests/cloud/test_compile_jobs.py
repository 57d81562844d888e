"""cloud.compile_jobs: a real compile of a small torch MLP (ONNX) for generic/x86_64 and
raspberry-pi/4b-aarch64 (verified under qemu when the aarch64 sysroot exists), uploaded to a
real fleet API and to a local store; failing profiles, retries, cancel and bad input."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from cloud.compile_jobs import (
    CompileInput,
    CompileOutcome,
    FleetApiUploader,
    LocalStoreUploader,
    UploadResult,
    failure_summary,
    profile_slug,
    request_fingerprint,
    run_compile,
    summarize_report,
)
from cloud.errors import CloudError, InvalidRequestError, JobCanceledError, JobFailedError
from compiler.settings import CompilerSettings
from compiler.signing import KeyPaths, generate_keys, load_public_key

from .fleet_api import FleetApi, running_fleet_api
from .test_lineage import _signed_bundle

X86 = "generic/x86_64"
RPI4 = "raspberry-pi/4b-aarch64"
STRICT = "test/strict-x86_64"  # an accuracy gate no compiled model can pass
MODEL = "digits-mlp"


def _strict_profile(root: Path) -> Path:
    """A copy of generic/x86_64 whose tolerances are below float32 rounding."""
    shipped = Path(__file__).resolve().parents[2] / "hw-profiles" / "generic" / "x86_64.yaml"
    text = shipped.read_text().replace("name: generic/x86_64", f"name: {STRICT}")
    for key in ("max_abs_error: 1.0e-4", "max_rel_error: 1.0e-3"):
        text = text.replace(key, key.split(":")[0] + ": 1.0e-30")
    path = root / "test" / "strict-x86_64.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return root


@dataclass(frozen=True)
class World:
    """A fleet API, a signing key it trusts, compiler settings and an exported MLP."""

    api: FleetApi
    keys: KeyPaths
    settings: CompilerSettings
    onnx: Path
    root: Path

    def request(self, *profiles: str, **kw: Any) -> CompileInput:
        return CompileInput(
            model_name=MODEL,
            model_version=kw.pop("model_version", 3),
            onnx=kw.pop("onnx", self.onnx),
            profiles=list(profiles),
            trials=0,
            **kw,
        )

    def compile(self, request: CompileInput, out_dir: Path, uploader: Any, **kw: Any) -> Any:
        return run_compile(
            request,
            settings=self.settings,
            tuning_db=self.root / "tuning",
            signing_key=kw.pop("signing_key", self.keys.private),
            out_dir=out_dir,
            uploader=uploader,
            **kw,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from tests.compiler import models

    root = tmp_path_factory.mktemp("compile-jobs")
    keys = generate_keys(root / "keys")
    onnx = models.export_onnx("mlp", root / "mlp.onnx")
    settings = CompilerSettings(
        config_dir=root / "config",
        tuning_db=root / "tuning",
        profiles_dir=_strict_profile(root / "profiles"),
    )
    with running_fleet_api(root / "fleet", keys.public) as api:
        yield World(api=api, keys=keys, settings=settings, onnx=onnx, root=root)


class Recorder:
    """An ArtifactUploader that records calls and fails or lies on request."""

    destination = "recorder"

    def __init__(self, *, fail: dict[str, Exception] | None = None, lie: bool = False) -> None:
        self.fail = fail or {}
        self.lie = lie
        self.calls: list[Path] = []

    def upload(self, bundle_dir: Path) -> UploadResult:
        self.calls.append(bundle_dir)
        for slug, err in self.fail.items():
            if bundle_dir.name == slug:
                raise err
        from compiler.bundle import read_manifest
        from compiler.manifest import artifact_id_of

        _, data = read_manifest(bundle_dir)
        return UploadResult("0" * 64 if self.lie else artifact_id_of(data), self.destination)


# ---------------------------------------------------------------- the real thing


@dataclass(frozen=True)
class FirstRun:
    outcomes: list[CompileOutcome]
    progress: list[tuple[float, str]]
    out_dir: Path


@pytest.fixture(scope="module")
def first_run(world: World) -> FirstRun:
    """Compile for x86, the strict profile (fails its gate) and the Pi 4; upload via the API."""
    progress: list[tuple[float, str]] = []
    out_dir = world.root / "job-1"
    with FleetApiUploader.connect(world.api.url, world.api.token) as uploader:
        outcomes = world.compile(
            world.request(X86, STRICT, RPI4),
            out_dir,
            uploader,
            on_progress=lambda f, m: progress.append((f, m)),
        )
    return FirstRun(outcomes, progress, out_dir)


@pytest.mark.slow
@pytest.mark.qemu
def test_compile_for_each_profile_and_upload_to_the_fleet_api(
    world: World, first_run: FirstRun
) -> None:
    from compiler import emulation
    from compiler.bundle import verify_bundle
    from fleet.store import ArtifactStore

    x86, strict, rpi4 = first_run.outcomes
    assert [o.profile for o in first_run.outcomes] == [X86, STRICT, RPI4]
    # The failing profile is recorded with its reason; the others went on.
    assert strict.error is not None and strict.error_kind == "AccuracyGateError"
    assert f"accuracy gate failed for {STRICT}" in strict.error
    assert strict.artifact_id is None and strict.bundle is None and not strict.uploaded
    assert not (first_run.out_dir / profile_slug(STRICT)).exists()
    assert failure_summary(first_run.outcomes) == f"{STRICT}: {strict.error}"

    public = load_public_key(world.keys.public)
    for outcome in (x86, rpi4):
        assert outcome.ok and outcome.uploaded and not outcome.reused
        assert outcome.destination == f"fleet API {world.api.url}"
        assert outcome.bundle == first_run.out_dir / profile_slug(outcome.profile)
        verified = verify_bundle(outcome.bundle, public)
        assert verified.artifact_id == outcome.artifact_id
        manifest = verified.manifest
        assert (manifest.model.name, manifest.model.version) == (MODEL, "3")
        assert manifest.profile == outcome.profile
        # trials=0 and an empty tuning db: no record applied, so no digest (as in the manifest)
        assert outcome.tuning_db_digest is None is manifest.tuning.database_digest
        assert outcome.report == summarize_report(verified.report())

    assert x86.report["verified"] is True and x86.report["verified_where"] == "native x86_64"
    assert x86.report["emulated"] is False
    assert x86.report["accuracy"]["logits"]["top1_agreement"] == 1.0
    if emulation.find_sysroot("aarch64", world.settings.cache_dir) is not None:
        assert rpi4.report["verified"] is True and rpi4.report["emulated"] is True
        assert rpi4.report["accuracy"]["logits"]["max_abs_error"] <= 1e-4
    else:
        if os.environ.get("CI"):
            pytest.fail("CI must verify the aarch64 artifact under qemu (no sysroot)")
        assert rpi4.report["verified"] is False
        assert "no aarch64 Python sysroot" in rpi4.report["not_verified_reason"]

    # In the fleet: the store holds both, and the models route groups them under v3.
    with ArtifactStore(world.api.store, public) as store:
        assert {store.get(o.artifact_id or "").profile for o in (x86, rpi4)} == {X86, RPI4}
    headers = {"Authorization": f"Bearer {world.api.token}"}
    model = httpx.get(f"{world.api.url}/models/{MODEL}", headers=headers, timeout=10).json()
    assert model["versions"][0]["version"] == "3"
    assert model["versions"][0]["artifacts"] == {X86: x86.artifact_id, RPI4: rpi4.artifact_id}

    # Progress: monotonic in 0..1, ends at 1, every profile announced.
    fractions = [f for f, _ in first_run.progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    messages = "\n".join(m for _, m in first_run.progress)
    for profile in (X86, STRICT, RPI4):
        assert f"{profile}: " in messages
    assert f"[2/3] {STRICT}: FAILED: accuracy gate failed" in messages
    assert f"[3/3] {RPI4}: ok" in messages


@pytest.mark.slow
@pytest.mark.qemu  # uses first_run, which runs the aarch64 artifact
def test_retry_reuses_bundles_and_reupload_is_idempotent(world: World, first_run: FirstRun) -> None:
    from fleet.sdk import FleetClient

    x86, _, rpi4 = first_run.outcomes
    with FleetClient(world.api.url, world.api.token) as client:
        before = client.list_artifacts(model_name=MODEL)
        uploader = FleetApiUploader(client)  # the client stays the caller's to close
        again = world.compile(world.request(X86, RPI4), first_run.out_dir, uploader)
        after = client.list_artifacts(model_name=MODEL)
    assert [(o.profile, o.artifact_id, o.reused, o.uploaded) for o in again] == [
        (X86, x86.artifact_id, True, True),
        (RPI4, rpi4.artifact_id, True, True),
    ]
    assert after.count == before.count == 2  # the fleet answered 200, no new rows


@pytest.mark.slow
@pytest.mark.qemu  # uses first_run, which runs the aarch64 artifact
def test_upload_failures_are_recorded_per_profile(world: World, first_run: FirstRun) -> None:
    x86, _, rpi4 = first_run.outcomes
    failing = Recorder(fail={profile_slug(RPI4): CloudError("fleet down")})
    outcomes = world.compile(world.request(X86, RPI4), first_run.out_dir, failing)
    assert [(o.profile, o.uploaded, o.error) for o in outcomes] == [
        (X86, True, None),
        (RPI4, False, "upload failed: fleet down"),
    ]
    assert outcomes[1].artifact_id == rpi4.artifact_id and outcomes[1].error_kind == "CloudError"

    with pytest.raises(JobFailedError, match="failed for every profile") as err:
        world.compile(world.request(X86), first_run.out_dir, Recorder(lie=True))
    assert f"stored artifact {'0' * 64}, not the compiled {x86.artifact_id}" in str(err.value)


@pytest.mark.slow
@pytest.mark.qemu  # uses first_run, which runs the aarch64 artifact
def test_local_store_uploader_is_idempotent(world: World, first_run: FirstRun) -> None:
    x86, _, rpi4 = first_run.outcomes
    with LocalStoreUploader.open(world.root / "local-store", world.keys.public) as uploader:
        assert uploader.destination == f"artifact store {world.root / 'local-store'}"
        for outcome in (x86, rpi4, x86):
            assert outcome.bundle is not None
            assert uploader.upload(outcome.bundle).artifact_id == outcome.artifact_id
        assert sorted(a.artifact_id for a in uploader.store.list()) == sorted(
            [x86.artifact_id or "", rpi4.artifact_id or ""]
        )

    other = generate_keys(world.root / "other-keys")
    with LocalStoreUploader.open(world.root / "other-store", other.public) as uploader:
        assert x86.bundle is not None
        with pytest.raises(InvalidRequestError, match="refused artifact 'generic__x86_64'.*key"):
            uploader.upload(x86.bundle)
        assert uploader.store.list() == []


@pytest.mark.slow
@pytest.mark.qemu  # uses first_run, which runs the aarch64 artifact
def test_a_tampered_earlier_bundle_is_not_reused(world: World, first_run: FirstRun) -> None:
    out_dir = world.root / "job-tampered"
    shutil.copytree(first_run.out_dir, out_dir)
    report = out_dir / profile_slug(X86) / "report.json"
    report.write_text(report.read_text().replace('"schema_version": 1', '"schema_version": 2'))
    messages: list[str] = []
    recorder = Recorder()
    # Stop once the compiler has started loading the model: a rebuild, not a reuse.
    with pytest.raises(JobCanceledError, match="compile canceled after 0 of 1 profile"):
        world.compile(
            world.request(X86),
            out_dir,
            recorder,
            on_progress=lambda _f, m: messages.append(m),
            should_stop=lambda: any(": loading " in m for m in messages),
        )
    assert any(m.startswith(f"{X86}: loading mlp.onnx") for m in messages), messages
    assert not any("reusing" in m for m in messages) and recorder.calls == []
    assert not (out_dir / f"{profile_slug(X86)}.request.json").exists()


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize(
    ("profiles", "kw", "message"),
    [
        (["rpi4"], {}, "unknown hardware profile 'rpi4'; choose from: .*generic/x86_64"),
        (
            [X86, "raspberry-pi/3b-armv7"],
            {"runtime": "onnxruntime"},
            "runtime 'onnxruntime' is not available on raspberry-pi/3b-armv7; "
            "its runtimes are: tvm, tflite",
        ),
        ([X86], {"onnx": Path("/nonexistent/model.onnx")}, "model file '/nonexistent/model.onnx' "),
        (
            [X86],
            {"calibration_data": Path("/nonexistent/x.npz")},
            "calibration data '/nonexistent/x.npz' does not exist",
        ),
    ],
    ids=["unknown-profile", "runtime-not-on-profile", "missing-onnx", "missing-calibration"],
)
def test_bad_requests_fail_before_any_work(
    world: World, tmp_path: Path, profiles: list[str], kw: dict[str, Any], message: str
) -> None:
    recorder = Recorder()
    with pytest.raises(InvalidRequestError, match=message) as err:
        world.compile(world.request(*profiles, **kw), tmp_path / "out", recorder)
    assert err.value.http_status == 422 and err.value.exit_code == 2
    assert recorder.calls == [] and not (tmp_path / "out").exists()


def test_missing_or_invalid_signing_key(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "no-keys" / "signing-key.pem"
    with pytest.raises(InvalidRequestError) as err:
        world.compile(world.request(X86), tmp_path / "out", Recorder(), signing_key=missing)
    assert f"signing key '{missing}' does not exist" in str(err.value)
    assert "edgeloop keys generate" in str(err.value)

    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello")
    with pytest.raises(InvalidRequestError, match="signing key: .*is not a PEM private key"):
        world.compile(world.request(X86), tmp_path / "out", Recorder(), signing_key=not_a_key)
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_load_fails_every_profile(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf")
    recorder = Recorder()
    with pytest.raises(JobFailedError) as err:
        world.compile(world.request(X86, RPI4, onnx=bad), tmp_path / "out", recorder)
    message = str(err.value)
    assert message.startswith(f"compiling {MODEL} v3 failed for every profile: {X86}: ")
    assert f"; {RPI4}: " in message and "bad.onnx" in message
    assert recorder.calls == [] and err.value.exit_code == 4
    assert not (tmp_path / "out" / profile_slug(X86)).exists()


@pytest.mark.parametrize(("stop_after", "done"), [(0, "0 of 2"), (1, "0 of 2")])
def test_cancel_between_steps(world: World, tmp_path: Path, stop_after: int, done: str) -> None:
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > stop_after

    with pytest.raises(JobCanceledError, match=f"compile canceled after {done} profile"):
        world.compile(
            world.request(X86, RPI4), tmp_path / "out", Recorder(), should_stop=should_stop
        )
    assert not (tmp_path / "out" / profile_slug(X86)).exists()  # staging removed


# ---------------------------------------------------------------- fleet API uploader errors


def test_fleet_api_uploader_errors(world: World, tmp_path: Path) -> None:
    from fleet.sdk import FleetClient
    from tests.fleet.api.test_api_cli import free_url

    good = _signed_bundle(tmp_path / "good", world.keys.private, profile=X86)
    other = generate_keys(tmp_path / "other")
    foreign = _signed_bundle(tmp_path / "foreign", other.private, profile=X86)

    with FleetApiUploader.connect(world.api.url, world.api.token) as uploader:
        first = uploader.upload(good)
        assert uploader.upload(good) == first  # 200 the second time
        with pytest.raises(InvalidRequestError) as err:
            uploader.upload(foreign)
    assert f"the fleet API at {world.api.url} refused artifact 'foreign'" in str(err.value)
    assert "signed with key" in str(err.value)  # the fleet's own reason

    with FleetApiUploader.connect(world.api.url, "elk_nosuchkey_secret") as uploader:
        with pytest.raises(CloudError, match="HTTP 401: .*EDGELOOP_CLOUD_FLEET_API_KEY"):
            uploader.upload(good)
    with FleetClient(world.api.url, world.api.token) as admin:
        reader = admin.create_api_key("reader", ["fleet:read"]).token
    with FleetApiUploader.connect(world.api.url, reader) as uploader:
        with pytest.raises(CloudError, match="HTTP 403: .*'deploy' scope"):
            uploader.upload(good)
    url = free_url()
    with FleetApiUploader.connect(url, world.api.token, timeout=2) as uploader:
        with pytest.raises(CloudError, match=f"cannot upload to the fleet API at {url}"):
            uploader.upload(good)
    with pytest.raises(InvalidRequestError, match="EDGELOOP_CLOUD_FLEET_URL"):
        FleetApiUploader.connect("", "x")
    with pytest.raises(InvalidRequestError, match="EDGELOOP_CLOUD_FLEET_API_KEY"):
        FleetApiUploader.connect(world.api.url, "")


# ---------------------------------------------------------------- pure parts


def test_compile_input_validation() -> None:
    as_int: dict[str, Any] = {"model_version": 3}  # the registry's int version becomes "3"
    ok = CompileInput(model_name=MODEL, onnx=Path("m.onnx"), profiles=[X86], **as_int)
    assert ok.model_version == "3" and ok.trials is None and ok.runtime == "auto"
    bad: list[dict[str, Any]] = [
        {"profiles": []},
        {"profiles": [X86, RPI4, X86]},
        {"runtime": "tflite"},
        {"trials": -1},
        {"input_shapes": {"input": [1, 0]}},
        {"model_name": ""},
        {"surprise": 1},
    ]
    messages = []
    for change in bad:
        fields: dict[str, Any] = {
            "model_name": MODEL,
            "model_version": "3",
            "onnx": Path("m.onnx"),
            "profiles": [X86],
        }
        with pytest.raises(ValidationError) as err:
            CompileInput(**{**fields, **change})
        messages.append(str(err.value))
    assert f"profile(s) listed more than once: {X86}" in messages[1]
    assert "input 'input' has shape [1, 0]" in messages[4]


def test_fingerprint_changes_with_every_input() -> None:
    base = CompileInput(model_name=MODEL, model_version="3", onnx=Path("m.onnx"), profiles=[X86])
    args: dict[str, Any] = {
        "onnx_sha256": "1" * 64,
        "calibration_sha256": None,
        "signing_key_id": "k" * 16,
    }
    reference = request_fingerprint(base, X86, **args)
    assert request_fingerprint(base, X86, **args) == reference
    variants = [
        request_fingerprint(base.model_copy(update={"model_version": "4"}), X86, **args),
        request_fingerprint(base.model_copy(update={"trials": 8}), X86, **args),
        request_fingerprint(base.model_copy(update={"input_shapes": {"x": [1, 4]}}), X86, **args),
        request_fingerprint(base, RPI4, **args),
        request_fingerprint(base, X86, **{**args, "onnx_sha256": "2" * 64}),
        request_fingerprint(base, X86, **{**args, "signing_key_id": "j" * 16}),
        request_fingerprint(base, X86, **{**args, "calibration_sha256": "3" * 64}),
    ]
    assert all(v != reference for v in variants)


def test_summarize_report() -> None:
    report = {
        "verification": {"executed": False, "where": "qemu-aarch64", "reason": "no sysroot"},
        "accuracy": None,
        "latency": {},
        "runtime": {"chosen": "tvm"},
        "resources": {"artifact_bytes": 1234},
    }
    assert summarize_report(report) == {
        "runtime": "tvm",
        "verified": False,
        "verified_where": "qemu-aarch64",
        "emulated": None,
        "not_verified_reason": "no sysroot",
        "accuracy": None,
        "latency_median_ms": {},
        "tuning_records_applied": 0,
        "tuning_new_trials": 0,
        "artifact_bytes": 1234,
    }
    assert failure_summary([CompileOutcome(profile=X86)]) is None

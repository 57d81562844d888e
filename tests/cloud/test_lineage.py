"""cloud.lineage: the pure assembly over a table-backed registry fake, its rendering, and
FleetDeviceSource against a real fleet API (signed bundles without TVM)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cloud.errors import CloudError, InvalidRequestError, NotFoundError
from cloud.lineage import (
    CompileNode,
    DatasetNode,
    DeviceNode,
    FleetDeviceSource,
    Lineage,
    ModelVersionNode,
    TrainingRunNode,
    build_lineage,
    check_artifact_id,
    deployment_targets,
    devices_from_states,
    render_lineage,
    render_text,
)
from fleet.models import DeploymentDevice, DeploymentPublic, DevicePublic, DeviceStatePublic

ART = "a" * 64
OTHER = "b" * 64
T0 = datetime(2026, 11, 1, tzinfo=UTC)


# ---------------------------------------------------------------- a registry as tables


@dataclass
class Registry:
    """The LineageSource protocol over dicts (what the service does over its tables)."""

    compiles: dict[str, CompileNode] = field(default_factory=dict)
    versions: dict[str, ModelVersionNode] = field(default_factory=dict)
    runs: dict[str, TrainingRunNode] = field(default_factory=dict)
    datasets: dict[str, DatasetNode] = field(default_factory=dict)

    def compile_record(self, artifact_id: str) -> CompileNode | None:
        return self.compiles.get(artifact_id)

    def model_version(self, version_id: str) -> ModelVersionNode | None:
        return self.versions.get(version_id)

    def training_run(self, job_id: str) -> TrainingRunNode | None:
        return self.runs.get(job_id)

    def dataset(self, dataset_id: str) -> DatasetNode | None:
        return self.datasets.get(dataset_id)


def dataset(id: str, version: int = 1) -> DatasetNode:
    return DatasetNode(
        id=id,
        name="digits",
        version=version,
        kind="builtin",
        digest="d" * 64,
        n_samples=1797,
        classes=[str(i) for i in range(10)],
        input_shape=[64],
        created_at=T0,
    )


def run(id: str, dataset_id: str | None = "ds1", **kw: Any) -> TrainingRunNode:
    return TrainingRunNode(
        id=id,
        kind=kw.pop("kind", "train"),
        state="SUCCEEDED",
        architecture="mlp",
        hparams={"hidden": 64, "dropout": 0.1},
        metrics={"test_accuracy": 0.9611},
        dataset_id=dataset_id,
        **kw,
    )


def version(id: str, v: int, **kw: Any) -> ModelVersionNode:
    kw.setdefault("training_job_id", f"job-{id}")
    kw.setdefault("dataset_id", "ds1")
    return ModelVersionNode(
        id=id,
        model="digits-mlp",
        version=v,
        stage="production" if v == 3 else "none",
        metrics={"test_accuracy": 0.95 + v / 100},
        code_version="0.1.0",
        **kw,
    )


def compile_of(version_id: str = "mv3", artifact_id: str = ART) -> CompileNode:
    return CompileNode(
        artifact_id=artifact_id,
        model_version_id=version_id,
        profile="raspberry-pi/4b-aarch64",
        job_id="job-compile",
        tuning_db_digest="e" * 64,
        fleet_uploaded=True,
        created_at=T0,
    )


@pytest.fixture()
def registry() -> Registry:
    """digits-mlp v3 (retrained from v2, itself from v1), compiled into ART."""
    reg = Registry()
    reg.datasets = {"ds1": dataset("ds1"), "ds2": dataset("ds2", 2)}
    reg.versions = {
        "mv1": version("mv1", 1),
        "mv2": version("mv2", 2, parent_version_id="mv1"),
        "mv3": version("mv3", 3, parent_version_id="mv2", dataset_id="ds2"),
    }
    reg.runs = {f"job-mv{i}": run(f"job-mv{i}") for i in (1, 2, 3)}
    reg.compiles = {ART: compile_of()}
    return reg


class Devices:
    """A DeviceSource fake: fixed devices, or a failure."""

    def __init__(self, devices: list[DeviceNode], fail: Exception | None = None) -> None:
        self.devices = devices
        self.fail = fail
        self.asked: list[tuple[str, str, str]] = []

    def devices_for(self, artifact_id: str, *, model_name: str, profile: str) -> list[DeviceNode]:
        self.asked.append((artifact_id, model_name, profile))
        if self.fail is not None:
            raise self.fail
        return self.devices


def device(device_id: str, status: str = "running") -> DeviceNode:
    return DeviceNode(
        device_id=device_id,
        profile="raspberry-pi/4b-aarch64",
        status=status,  # type: ignore[arg-type]
        role="primary",
        online=True,
        last_seen=T0,
    )


# ---------------------------------------------------------------- assembly


def test_full_chain(registry: Registry) -> None:
    fleet = Devices([device("rpi-2"), device("rpi-1", "pending")])
    lineage = build_lineage(ART, registry, fleet)
    assert lineage.compile == registry.compiles[ART]
    assert lineage.model_version == registry.versions["mv3"]
    assert lineage.training_run == registry.runs["job-mv3"]
    assert lineage.dataset == registry.datasets["ds2"]
    assert [p.model_version.id for p in lineage.parents] == ["mv2", "mv1"]
    assert [p.dataset.id if p.dataset else None for p in lineage.parents] == ["ds1", "ds1"]
    assert [d.device_id for d in lineage.devices or []] == ["rpi-1", "rpi-2"]  # sorted
    assert lineage.gaps == [] and lineage.devices_note is None
    assert fleet.asked == [(ART, "digits-mlp", "raspberry-pi/4b-aarch64")]


def test_json_round_trip(registry: Registry) -> None:
    lineage = build_lineage(ART, registry, Devices([device("rpi-1")]))
    data = json.loads(json.dumps(lineage.model_dump(mode="json")))
    assert data["schema_version"] == 1
    assert data["dataset"]["digest"] == "d" * 64
    assert data["compile"]["tuning_db_digest"] == "e" * 64
    assert Lineage.model_validate(data) == lineage


@pytest.mark.parametrize(
    ("change", "gap", "check"),
    [
        (
            lambda r: r.runs.pop("job-mv3"),
            "training job job-mv3 of digits-mlp v3 no longer exists",
            lambda lin: lin.training_run is None and lin.dataset is not None,
        ),
        (
            lambda r: r.datasets.pop("ds2"),
            "dataset ds2 of digits-mlp v3 no longer exists",
            lambda lin: lin.dataset is None and lin.training_run is not None,
        ),
        (
            lambda r: r.versions.pop("mv1"),
            "parent version mv1 of digits-mlp v2 no longer exists",
            lambda lin: [p.model_version.id for p in lin.parents] == ["mv2"],
        ),
        (
            lambda r: r.versions.pop("mv3"),
            "model version mv3 of the compile no longer exists",
            lambda lin: lin.model_version is None and lin.parents == [],
        ),
        (
            lambda r: r.versions.update(mv1=version("mv1", 1, parent_version_id="mv3")),
            "model version mv3 is its own ancestor (a cycle); chain cut",
            lambda lin: [p.model_version.id for p in lin.parents] == ["mv2", "mv1"],
        ),
    ],
    ids=["run-gone", "dataset-gone", "parent-gone", "version-gone", "cycle"],
)
def test_missing_links_are_gaps(registry: Registry, change: Any, gap: str, check: Any) -> None:
    change(registry)
    lineage = build_lineage(ART, registry, None)
    assert lineage.gaps == [gap]
    assert check(lineage)


def test_dataset_found_through_the_run(registry: Registry) -> None:
    registry.versions["mv3"] = version("mv3", 3, dataset_id=None)
    registry.runs["job-mv3"] = run("job-mv3", dataset_id="ds1")
    lineage = build_lineage(ART, registry, None)
    assert lineage.dataset is not None and lineage.dataset.id == "ds1"


def test_a_version_without_run_or_dataset(registry: Registry) -> None:
    registry.versions["mv3"] = version("mv3", 3, training_job_id=None, dataset_id=None)
    lineage = build_lineage(ART, registry, None)
    assert lineage.training_run is None and lineage.dataset is None and lineage.gaps == []


def test_fleet_not_asked_or_failing(registry: Registry) -> None:
    lineage = build_lineage(ART, registry, None)
    assert lineage.devices is None
    assert lineage.devices_note == "the fleet was not asked (no fleet API configured)"
    failing = Devices([], fail=CloudError("the fleet API at http://x failed: HTTP 401: no key"))
    lineage = build_lineage(ART, registry, failing)
    assert lineage.devices is None
    assert (
        lineage.devices_note
        == "devices unknown: the fleet API at http://x failed: HTTP 401: no key"
    )
    assert lineage.model_version is not None  # the registry part still answers


def test_unknown_artifact_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match=f"no compile job produced artifact {OTHER}") as err:
        build_lineage(OTHER, registry, None)
    assert err.value.http_status == 404 and err.value.exit_code == 2


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61])
def test_malformed_artifact_id(registry: Registry, bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="expected 64 lowercase hex digits") as err:
        build_lineage(bad, registry, None)
    assert repr(bad) in str(err.value)
    assert check_artifact_id(ART) == ART


# ---------------------------------------------------------------- rendering


def test_render_text_names_every_link(registry: Registry) -> None:
    text = render_text(build_lineage(ART, registry, Devices([device("rpi-1")])), width=200)
    lines = text.splitlines()
    assert lines[0] == f"artifact {ART} (raspberry-pi/4b-aarch64, in the fleet store)"
    for expected in (
        "devices 1 running or pending",
        "rpi-1 running (primary, online, last seen 2026-11-01T00:00:00+00:00)",
        "compile raspberry-pi/4b-aarch64 (job job-compile, tuning db eeeeeeeeeeee) 2026-11-01",
        "model version digits-mlp v3 (stage production); test_accuracy 0.98; code 0.1.0",
        "training run train job job-mv3 SUCCEEDED; mlp; dropout 0.1, hidden 64; "
        "test_accuracy 0.9611",
        "dataset digits v2 (builtin, 1797 samples, 10 classes, input 64) sha256 dddddddddddd",
        "parent version digits-mlp v2 (stage none)",
        "parent version digits-mlp v1 (stage none)",
    ):
        assert any(expected in line for line in lines), (expected, text)
    # the tree nests: dataset under run under version under compile
    depth = {
        k: next(i for i, ln in enumerate(lines) if k in ln)
        for k in ("compile", "v3 (", "train job job-mv3", "digits v2")
    }
    assert depth["compile"] < depth["v3 ("] < depth["train job job-mv3"] < depth["digits v2"]


def test_render_untuned_gaps_and_markup(registry: Registry) -> None:
    registry.compiles[ART] = compile_of().model_copy(
        update={"tuning_db_digest": None, "fleet_uploaded": False}
    )
    registry.runs.pop("job-mv2")
    registry.versions["mv3"] = registry.versions["mv3"].model_copy(
        update={"model": "odd[bold]name"}
    )
    text = render_text(build_lineage(ART, registry, None), width=200)
    assert "NOT uploaded to the fleet" in text
    assert "untuned: no tuning records applied" in text
    assert "odd[bold]name v3" in text  # user text is not taken as rich markup
    assert "devices the fleet was not asked (no fleet API configured)" in text
    assert "gap training job job-mv2 of digits-mlp v2 no longer exists" in text
    assert render_lineage(build_lineage(ART, registry, None)).label is not None


# ---------------------------------------------------------------- devices from the fleet's answers


def _device(device_id: str, profile: str = "raspberry-pi/4b-aarch64") -> DevicePublic:
    return DevicePublic(
        device_id=device_id, profile=profile, tags={}, created_at=T0, revoked=False, revoked_at=None
    )


def _state(
    device_id: str, reported: list[dict[str, Any]], desired: dict[str, str]
) -> DeviceStatePublic:
    return DeviceStatePublic(
        device_id=device_id,
        online=True,
        last_seen=T0,
        reported_models=reported,
        desired_models=desired,
        diff=[],
        in_sync=True,
    )


def _model(artifact_id: str, role: str = "primary", name: str = "digits-mlp") -> dict[str, Any]:
    return {
        "name": name,
        "version": "3",
        "artifact_id": artifact_id,
        "runtime": "tvm",
        "role": role,
    }


@pytest.mark.parametrize(
    ("reported", "desired", "expected"),
    [
        ([_model(ART)], {}, ("running", "primary")),
        ([_model(ART, "shadow")], {}, ("running", "shadow")),
        (
            [_model(OTHER), _model(ART, "candidate")],
            {"digits-mlp": OTHER},
            ("running", "candidate"),
        ),
        ([_model(OTHER)], {"digits-mlp": ART}, ("pending", "primary")),
        ([], {"digits-mlp": ART}, ("pending", "primary")),
        ([_model(OTHER)], {"digits-mlp": OTHER}, None),
        ([], {"other-model": ART}, None),
        ([], {}, None),
    ],
    ids=[
        "primary",
        "shadow",
        "candidate",
        "pending",
        "pending-new",
        "other",
        "other-model",
        "none",
    ],
)
def test_devices_from_states(
    reported: list[dict[str, Any]], desired: dict[str, str], expected: tuple[str, str] | None
) -> None:
    found = devices_from_states(
        ART,
        model_name="digits-mlp",
        devices=[_device("d1"), _device("d2")],
        states={"d1": _state("d1", reported, desired)},  # d2 has no state: left out
        deployments={"d1": "rollout-1"},
    )
    if expected is None:
        assert found == []
        return
    assert [(d.device_id, d.status, d.role, d.deployment) for d in found] == [
        ("d1", *expected, "rollout-1")
    ]


def _deployment(name: str, created: datetime, devices: dict[str, str]) -> DeploymentPublic:
    return DeploymentPublic(
        id="00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
        name=name,
        model_name="digits-mlp",
        variants={"raspberry-pi/4b-aarch64": ART, "generic/x86_64": OTHER},
        target={"device_ids": list(devices)},  # type: ignore[arg-type]
        policy={},
        phase="RUNNING",
        reason=None,
        stage=0,
        stages=[],
        devices=[
            DeploymentDevice(
                device_id=d,
                artifact_id=a,
                previous_artifact_id=None,
                attempts=0,
                state="NOT_STARTED",
                job_id=None,
                reason=None,
                rollback_state=None,
                rollback_reason=None,
            )
            for d, a in devices.items()
        ],
        counts={},
        unmatched=[],
        created_at=created,
        updated_at=created,
    )


def test_deployment_targets_newest_wins() -> None:
    old = _deployment("first", T0, {"d1": ART, "d2": ART, "x1": OTHER})
    new = _deployment("second", T0.replace(day=2), {"d2": ART})
    assert deployment_targets(ART, [new, old]) == {"d1": "first", "d2": "second"}
    assert deployment_targets("c" * 64, [new, old]) == {}


# ---------------------------------------------------------------- against a real fleet API


@pytest.fixture()
def fleet_api(tmp_path: Path) -> Iterator[Any]:
    from compiler.signing import generate_keys

    from .fleet_api import running_fleet_api

    keys = generate_keys(tmp_path / "keys")
    with running_fleet_api(tmp_path / "fleet", keys.public) as api:
        yield api, keys


def _signed_bundle(root: Path, key_path: Path, *, profile: str) -> Path:
    """A sealed bundle with a fake model.so (no TVM), like tests/fleet/conftest.py."""
    from compiler import bundle
    from compiler.signing import load_private_key
    from tests.fleet.conftest import manifest_fields

    fields = manifest_fields("3")
    fields.update(model={"name": "digits-mlp", "version": "3"}, profile=profile)
    with bundle.staging_dir(root) as staging:
        (staging / "model.so").write_bytes(os.urandom(4096))
        (staging / "report.json").write_text("{}")
        bundle.seal_bundle(
            staging, root, manifest_fields=fields, private_key=load_private_key(key_path)
        )
    return root


def test_fleet_device_source_against_the_api(fleet_api: Any, tmp_path: Path) -> None:
    from fleet.sdk import FleetClient

    api, keys = fleet_api
    profile = "raspberry-pi/4b-aarch64"
    with FleetClient(api.url, api.token) as client:
        art = client.upload_artifact(_signed_bundle(tmp_path / "b", keys.private, profile=profile))
        for device_id, p in [
            ("rpi-running", profile),
            ("rpi-pending", profile),
            ("rpi-other", profile),
            ("rpi-idle", profile),
            ("x86-shadow", "generic/x86_64"),
            ("x86-none", "generic/x86_64"),
            ("rpi-revoked", profile),
        ]:
            client.register_device(device_id, profile=p)
        client.create_deployment(
            "to-pending",
            model_name="digits-mlp",
            variants={profile: art.artifact_id},
            device_ids=["rpi-pending"],
            policy={"waves": ["100%"]},
        )
        api.report("rpi-running", reported=[_model(art.artifact_id)])
        api.report("rpi-pending", reported=[_model(OTHER)], desired={"digits-mlp": art.artifact_id})
        api.report("rpi-other", reported=[_model(OTHER)], online=False)
        api.report("rpi-revoked", reported=[_model(art.artifact_id)])
        client.revoke_device("rpi-revoked")
        # A device of another profile that no deployment names is not asked (one state
        # request per candidate keeps lineage cheap on large fleets); see docs/cloud.md.
        api.report("x86-shadow", reported=[_model(art.artifact_id, "shadow")])

        found = FleetDeviceSource(client).devices_for(
            art.artifact_id, model_name="digits-mlp", profile=profile
        )
    assert [(d.device_id, d.status, d.role, d.online, d.deployment) for d in found] == [
        ("rpi-pending", "pending", "primary", True, "to-pending"),
        ("rpi-running", "running", "primary", True, None),
    ]


def test_fleet_device_source_failure_is_a_cloud_error(fleet_api: Any) -> None:
    from fleet.sdk import FleetClient

    api, _ = fleet_api
    with FleetClient(api.url, "elk_nosuchkey_secret") as client:
        with pytest.raises(CloudError, match=f"the fleet API at {api.url} failed: .*HTTP 401"):
            FleetDeviceSource(client).devices_for(ART, model_name="m", profile="generic/x86_64")

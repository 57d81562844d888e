"""Lineage of an artifact: dataset → training run → model version (+ parents) → compile →
artifact → devices running it.

Pure assembly: :func:`build_lineage` asks two small Protocols and puts the answers together.

* :class:`LineageSource` is the cloud's registry (the service implements it over its
  tables): a compile record by artifact id, a model version, a training job and a dataset,
  each by id, as the node models below (``None`` when there is no such row).
* :class:`DeviceSource` (optional) says which devices run or are to run the artifact;
  :class:`FleetDeviceSource` asks the fleet API through :class:`fleet.sdk.FleetClient`.

A link that points at a missing row (a deleted dataset, a parent cycle) does not fail the
lineage: the chain stops there and :attr:`Lineage.gaps` says why. An artifact no compile
record names is :class:`~cloud.errors.NotFoundError`; a malformed id
:class:`~cloud.errors.InvalidRequestError`. :func:`render_lineage` draws a rich tree, and
``Lineage.model_dump(mode="json")`` is the JSON form (``edgeloop lineage --json``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cloud.errors import CloudError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from rich.tree import Tree

    from fleet.models import DeploymentPublic, DevicePublic, DeviceStatePublic
    from fleet.sdk import FleetClient

_ARTIFACT_ID_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PARENTS = 100
_PAGE = 1000


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetNode(_Node):
    """A registered dataset version."""

    id: str
    name: str
    version: int | str
    kind: str
    digest: str = Field(description="sha256 of the dataset's content.")
    n_samples: int | None = None
    classes: list[str] = Field(default_factory=list)
    input_shape: list[int] | None = None
    created_at: datetime | None = None


class TrainingRunNode(_Node):
    """The job that trained a model version (a train job, or the HPO trial that won)."""

    id: str
    kind: str = Field(description="train, hpo or hpo_worker.")
    state: str
    architecture: str | None = None
    hparams: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    dataset_id: str | None = None
    parent_job_id: str | None = Field(default=None, description="The HPO job of a worker.")
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ModelVersionNode(_Node):
    """A registered model version."""

    id: str
    model: str
    version: int | str
    stage: str = "none"
    metrics: dict[str, float] = Field(default_factory=dict)
    hparams: dict[str, Any] = Field(default_factory=dict)
    code_version: str | None = None
    dataset_id: str | None = None
    training_job_id: str | None = None
    parent_version_id: str | None = None
    created_at: datetime | None = None


class CompileNode(_Node):
    """The compile that produced the artifact (one profile of a compile job)."""

    artifact_id: str
    model_version_id: str
    profile: str
    job_id: str | None = None
    tuning_db_digest: str | None = Field(
        default=None, description="sha256 of the tuning records applied; None: untuned."
    )
    fleet_uploaded: bool = False
    created_at: datetime | None = None


class DeviceNode(_Node):
    """A device that runs the artifact, or that the fleet wants to run it."""

    device_id: str
    profile: str
    status: Literal["running", "pending"] = Field(
        description="running: the device reports serving it; pending: the fleet wants it there."
    )
    role: str | None = Field(default=None, description="primary, candidate or shadow.")
    online: bool = False
    last_seen: datetime | None = None
    deployment: str | None = Field(default=None, description="Name of the deployment.")


class Ancestor(_Node):
    """A parent model version (a retrain's base) with its own run and dataset."""

    model_version: ModelVersionNode
    training_run: TrainingRunNode | None = None
    dataset: DatasetNode | None = None


class Lineage(_Node):
    """How an artifact came to be, and where it runs."""

    schema_version: Literal[1] = 1
    artifact_id: str
    compile: CompileNode
    model_version: ModelVersionNode | None = None
    training_run: TrainingRunNode | None = None
    dataset: DatasetNode | None = None
    parents: list[Ancestor] = Field(default_factory=list, description="Nearest first.")
    devices: list[DeviceNode] | None = Field(
        default=None, description="None when the fleet was not asked (see devices_note)."
    )
    devices_note: str | None = None
    gaps: list[str] = Field(default_factory=list, description="Links that could not be followed.")


class LineageSource(Protocol):
    """The registry's side of lineage (the cloud service implements it over its tables)."""

    def compile_record(self, artifact_id: str) -> CompileNode | None:
        """The (first) successful compile that produced ``artifact_id``, or None."""
        ...

    def model_version(self, version_id: str) -> ModelVersionNode | None:
        """A model version by id, or None."""
        ...

    def training_run(self, job_id: str) -> TrainingRunNode | None:
        """A training job by id, or None."""
        ...

    def dataset(self, dataset_id: str) -> DatasetNode | None:
        """A dataset version by id, or None."""
        ...


class DeviceSource(Protocol):
    """Which devices run an artifact."""

    def devices_for(self, artifact_id: str, *, model_name: str, profile: str) -> list[DeviceNode]:
        """Devices running ``artifact_id`` or meant to (by device id).

        Raises:
            CloudError: the fleet could not be asked (the message says why).
        """
        ...


def check_artifact_id(artifact_id: str) -> str:
    """``artifact_id`` if it is 64 lowercase hex digits.

    Raises:
        InvalidRequestError: naming the value and the expected form.
    """
    if not _ARTIFACT_ID_RE.match(artifact_id):
        raise InvalidRequestError(
            f"artifact id {artifact_id!r} is invalid; expected 64 lowercase hex digits "
            "(the sha256 of the artifact's manifest)"
        )
    return artifact_id


def build_lineage(
    artifact_id: str, repo: LineageSource, fleet: DeviceSource | None = None
) -> Lineage:
    """Assemble the lineage of ``artifact_id``.

    Args:
        artifact_id: the artifact (64 hex digits).
        repo: the registry.
        fleet: where to look for devices; None leaves ``devices`` unset.

    Returns:
        The lineage; missing links are listed in ``gaps``, a fleet failure in ``devices_note``.

    Raises:
        InvalidRequestError: a malformed artifact id.
        NotFoundError: no compile record names the artifact.
    """
    check_artifact_id(artifact_id)
    record = repo.compile_record(artifact_id)
    if record is None:
        raise NotFoundError(
            f"no compile job produced artifact {artifact_id}; lineage is known only for "
            "artifacts compiled by the cloud service (see 'edgeloop jobs list')"
        )
    gaps: list[str] = []
    version = repo.model_version(record.model_version_id)
    run: TrainingRunNode | None = None
    dataset: DatasetNode | None = None
    parents: list[Ancestor] = []
    if version is None:
        gaps.append(f"model version {record.model_version_id} of the compile no longer exists")
    else:
        run, dataset = _origin(repo, version, gaps)
        parents = list(_parents(repo, version, gaps))
    devices: list[DeviceNode] | None = None
    note: str | None = None
    if fleet is None:
        note = "the fleet was not asked (no fleet API configured)"
    else:
        model_name = version.model if version is not None else ""
        try:
            devices = sorted(
                fleet.devices_for(artifact_id, model_name=model_name, profile=record.profile),
                key=lambda d: d.device_id,
            )
        except CloudError as err:
            note = f"devices unknown: {err}"
    return Lineage(
        artifact_id=artifact_id,
        compile=record,
        model_version=version,
        training_run=run,
        dataset=dataset,
        parents=parents,
        devices=devices,
        devices_note=note,
        gaps=gaps,
    )


def _origin(
    repo: LineageSource, version: ModelVersionNode, gaps: list[str]
) -> tuple[TrainingRunNode | None, DatasetNode | None]:
    what = f"{version.model} v{version.version}"
    run = None
    if version.training_job_id is not None:
        run = repo.training_run(version.training_job_id)
        if run is None:
            gaps.append(f"training job {version.training_job_id} of {what} no longer exists")
    dataset_id = version.dataset_id or (run.dataset_id if run is not None else None)
    dataset = None
    if dataset_id is not None:
        dataset = repo.dataset(dataset_id)
        if dataset is None:
            gaps.append(f"dataset {dataset_id} of {what} no longer exists")
    return run, dataset


def _parents(repo: LineageSource, version: ModelVersionNode, gaps: list[str]) -> Iterator[Ancestor]:
    seen = {version.id}
    current = version
    while current.parent_version_id is not None:
        parent_id = current.parent_version_id
        if parent_id in seen:
            gaps.append(f"model version {parent_id} is its own ancestor (a cycle); chain cut")
            return
        if len(seen) > MAX_PARENTS:
            gaps.append(f"more than {MAX_PARENTS} parent versions; chain cut")
            return
        seen.add(parent_id)
        parent = repo.model_version(parent_id)
        if parent is None:
            gaps.append(
                f"parent version {parent_id} of {current.model} v{current.version} no longer exists"
            )
            return
        run, dataset = _origin(repo, parent, gaps)
        yield Ancestor(model_version=parent, training_run=run, dataset=dataset)
        current = parent


# ---------------------------------------------------------------- the fleet as a DeviceSource


def devices_from_states(
    artifact_id: str,
    *,
    model_name: str,
    devices: list[DevicePublic],
    states: dict[str, DeviceStatePublic],
    deployments: dict[str, str] | None = None,
) -> list[DeviceNode]:
    """Devices whose reported or desired state names ``artifact_id`` (pure).

    A device reporting the artifact (any role) is ``running``; one whose desired state for
    ``model_name`` is the artifact but which does not report it yet is ``pending``.
    ``deployments`` maps device id → the name of a deployment that targeted it with the
    artifact.
    """
    deployments = deployments or {}
    found = []
    for device in devices:
        state = states.get(device.device_id)
        if state is None:
            continue
        reported = [m for m in state.reported_models if m.get("artifact_id") == artifact_id]
        if reported:
            status: Literal["running", "pending"] = "running"
            role = ", ".join(sorted({str(m.get("role", "primary")) for m in reported}))
        elif model_name and state.desired_models.get(model_name) == artifact_id:
            status, role = "pending", "primary"
        else:
            continue
        found.append(
            DeviceNode(
                device_id=device.device_id,
                profile=device.profile,
                status=status,
                role=role,
                online=state.online,
                last_seen=state.last_seen,
                deployment=deployments.get(device.device_id),
            )
        )
    return found


def deployment_targets(artifact_id: str, deployments: list[DeploymentPublic]) -> dict[str, str]:
    """Device id → name of the newest deployment that gives it ``artifact_id`` (pure)."""
    targets: dict[str, str] = {}
    for deployment in sorted(deployments, key=lambda d: d.created_at):
        if artifact_id not in deployment.variants.values():
            continue
        for device in deployment.devices:
            if device.artifact_id == artifact_id:
                targets[device.device_id] = deployment.name
    return targets


class FleetDeviceSource:
    """Devices running an artifact, from the fleet API (needs the ``fleet:read`` scope).

    Candidates are the devices of the artifact's profile and the devices any deployment of
    the artifact targeted; each candidate's reported and desired state is then read
    (``GET /devices/{id}/state``). Revoked devices are left out.

    Args:
        client: a :class:`fleet.sdk.FleetClient`.
    """

    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def devices_for(self, artifact_id: str, *, model_name: str, profile: str) -> list[DeviceNode]:
        """See :class:`DeviceSource`.

        Raises:
            CloudError: the fleet API failed; the message carries its reason.
        """
        from fleet.sdk import FleetAPIError

        try:
            devices = self._all_devices()
            targets = deployment_targets(artifact_id, self._all_deployments())
            candidates = [d for d in devices if d.profile == profile or d.device_id in targets]
            states = {d.device_id: self.client.get_device_state(d.device_id) for d in candidates}
        except FleetAPIError as err:
            raise CloudError(f"the fleet API at {self.client.base_url} failed: {err}") from err
        return devices_from_states(
            artifact_id,
            model_name=model_name,
            devices=candidates,
            states=states,
            deployments=targets,
        )

    def _all_devices(self) -> list[DevicePublic]:
        found: list[DevicePublic] = []
        while True:
            page = self.client.list_devices(revoked=False, offset=len(found), limit=_PAGE)
            found.extend(page.data)
            if not page.data or len(found) >= page.count:
                return found

    def _all_deployments(self) -> list[DeploymentPublic]:
        found: list[DeploymentPublic] = []
        while True:
            page = self.client.list_deployments(offset=len(found), limit=_PAGE)
            found.extend(page.data)
            if not page.data or len(found) >= page.count:
                return found


# ---------------------------------------------------------------- rendering


def _short(value: str | None, n: int = 12) -> str:
    return value[:n] if value else "-"


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(values.items())
    )


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


def _dataset_label(dataset: DatasetNode) -> str:
    from rich.markup import escape

    shape = "x".join(map(str, dataset.input_shape)) if dataset.input_shape else "?"
    samples = f"{dataset.n_samples} samples, " if dataset.n_samples is not None else ""
    return "[bold]dataset[/] " + escape(
        f"{dataset.name} v{dataset.version} ({dataset.kind}, {samples}"
        f"{len(dataset.classes)} classes, input {shape}) sha256 {_short(dataset.digest)}"
    )


def _run_label(run: TrainingRunNode) -> str:
    from rich.markup import escape

    parent = f" (trial of HPO job {run.parent_job_id})" if run.parent_job_id else ""
    parts = [f"{run.kind} job {run.id}{parent} {run.state}"]
    if run.architecture:
        parts.append(run.architecture)
    if run.hparams:
        parts.append(_pairs(run.hparams))
    if run.metrics:
        parts.append(_pairs(run.metrics))
    return "[bold]training run[/] " + escape("; ".join(parts))


def _version_label(version: ModelVersionNode, *, what: str = "model version") -> str:
    from rich.markup import escape

    parts = [f"{version.model} v{version.version} (stage {version.stage})"]
    if version.metrics:
        parts.append(_pairs(version.metrics))
    if version.code_version:
        parts.append(f"code {version.code_version}")
    return f"[bold]{what}[/] " + escape("; ".join(parts))


def _origin_nodes(tree: Tree, run: TrainingRunNode | None, dataset: DatasetNode | None) -> None:
    if run is not None:
        branch = tree.add(_run_label(run))
        if dataset is not None:
            branch.add(_dataset_label(dataset))
    elif dataset is not None:
        tree.add(_dataset_label(dataset))


def render_lineage(lineage: Lineage) -> Tree:
    """A rich tree with the artifact at the root, the devices running it, and the chain
    compile → model version → training run → dataset, then the parent versions.

    Print it with ``rich.console.Console().print(...)``; :func:`render_text` for plain text.
    """
    from rich.markup import escape
    from rich.tree import Tree

    record = lineage.compile
    uploaded = "in the fleet store" if record.fleet_uploaded else "NOT uploaded to the fleet"
    root = Tree(
        f"[bold]artifact[/] {lineage.artifact_id} " + escape(f"({record.profile}, {uploaded})")
    )
    if lineage.devices is None:
        root.add("[bold]devices[/] " + escape(lineage.devices_note or "unknown"))
    else:
        devices = root.add(f"[bold]devices[/] {len(lineage.devices)} running or pending")
        for device in lineage.devices:
            online = "online" if device.online else "offline"
            seen = f", last seen {_when(device.last_seen)}" if device.last_seen else ""
            deployment = f", deployment {device.deployment}" if device.deployment else ""
            devices.add(
                escape(
                    f"{device.device_id} {device.status} ({device.role}, {online}{seen}"
                    f"{deployment})"
                )
            )
    tuning = (
        f"tuning db {_short(record.tuning_db_digest)}"
        if record.tuning_db_digest
        else "untuned: no tuning records applied"
    )
    job = f"job {record.job_id}, " if record.job_id else ""
    when = f" {_when(record.created_at)}" if record.created_at else ""
    compiled = root.add("[bold]compile[/] " + escape(f"{record.profile} ({job}{tuning}){when}"))
    if lineage.model_version is not None:
        version = compiled.add(_version_label(lineage.model_version))
        _origin_nodes(version, lineage.training_run, lineage.dataset)
        below = version
        for parent in lineage.parents:
            below = below.add(_version_label(parent.model_version, what="parent version"))
            _origin_nodes(below, parent.training_run, parent.dataset)
    for gap in lineage.gaps:
        root.add("[yellow]gap[/] " + escape(gap))
    return root


def render_text(lineage: Lineage, *, width: int = 120) -> str:
    """The tree of :func:`render_lineage` as plain text (no colour, no markup)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(width=width, file=buffer, color_system=None, no_color=True)
    console.print(render_lineage(lineage))
    return buffer.getvalue()


__all__ = [
    "Ancestor",
    "CompileNode",
    "DatasetNode",
    "DeviceNode",
    "DeviceSource",
    "FleetDeviceSource",
    "Lineage",
    "LineageSource",
    "ModelVersionNode",
    "TrainingRunNode",
    "build_lineage",
    "check_artifact_id",
    "deployment_targets",
    "devices_from_states",
    "render_lineage",
    "render_text",
]

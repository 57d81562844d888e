"""Relabeling: flagged samples become label tasks; people (or Label Studio) label or skip them.

Keyword-only helpers that flush and never commit (the route owns the transaction), like
:mod:`cloud.crud`:

* :func:`create_tasks`: one task per captured sample (a selection of sample ids, or every
  sample a drift alert's device sent for the alert's model version during its window);
  samples that already have a task are counted, not duplicated. The task's model version is
  the one that produced the sample (its artifact's compile record, else the model name and
  version the device reported); its top-1 index becomes the class name of ``prediction``.
* :func:`label_task` / :func:`skip_task`: the label must be one of the version's classes
  (:class:`~cloud.errors.InvalidRequestError` naming it and the choices); a task a retrain
  run already used cannot change (:class:`~cloud.errors.ConflictError`).
* :func:`export_labelstudio` / :func:`import_labelstudio`: the Label Studio round trip
  (:mod:`cloud.dataloop.labelstudio`); an import is validated whole before any task changes.
* :func:`labeled_dataset`: the labeled tasks' inputs and labels as an
  :class:`~cloud.datasets.ArrayDataset` in the model version's class order (for retraining).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import func
from sqlmodel import Session, col, select

from cloud import crud
from cloud.dataloop.labeling_models import (
    LabelTask,
    LabelTaskPublic,
    LabelTaskState,
)
from cloud.dataloop.models import DriftAlert, Sample
from cloud.errors import ConflictError, DatasetError, InvalidRequestError, NotFoundError
from cloud.models import CompileRecord, ModelVersion, RegisteredModel
from fleet.models import utcnow

if TYPE_CHECKING:
    from cloud.dataloop.labeling_models import LabelStudioImportResult
    from cloud.dataloop.labelstudio import ImportedLabel
    from cloud.datasets import ArrayDataset
    from cloud.settings import CloudSettings

MAX_ALERT_SAMPLES = 10_000


# ---------------------------------------------------------------- samples


def find_samples(session: Session, *, sample_ids: Sequence[str]) -> dict[str, Sample]:
    """The samples ``sample_ids`` that were ingested, by sample id."""
    if not sample_ids:
        return {}
    rows = session.exec(select(Sample).where(col(Sample.sample_id).in_(list(sample_ids))))
    return {r.sample_id: r for r in rows}


def alert_samples(session: Session, *, alert: DriftAlert) -> list[Sample]:
    """The samples the alert's device sent for the alert's model during the alert's window."""
    query = select(Sample).where(
        Sample.device_id == alert.device_id,
        Sample.model == alert.model,
        col(Sample.ts) >= alert.window_start,
        col(Sample.ts) <= alert.window_end,
    )
    return list(session.exec(query.order_by(col(Sample.ts)).limit(MAX_ALERT_SAMPLES)))


def tensor_dir(settings: CloudSettings) -> Path:
    """Where ingestion keeps captured tensors (:class:`cloud.dataloop.ingest.BlobStore`)."""
    return settings.resolved_blob_dir() / "samples"


def read_tensor(blob_dir: Path, ref: dict[str, Any]) -> npt.NDArray[Any]:
    """The stored tensor ``ref`` (a :class:`~cloud.dataloop.models.TensorRef` as a dict).

    Raises:
        OSError: the blob is missing.
        ValueError: the blob does not fit the dtype and shape.
    """
    from cloud.dataloop.ingest import BlobStore

    raw = BlobStore(blob_dir).tensor(ref)  # either layout, sha256 checked
    dtype = np.dtype(str(ref["dtype"])).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape([int(d) for d in ref["shape"]])


def sample_input(blob_dir: Path, sample: Sample) -> npt.NDArray[Any]:
    """The sample's first input tensor, read from the tensor blob directory.

    Raises:
        NotFoundError: the sample has no input or its blob is missing or damaged.
    """
    if not sample.inputs:
        raise NotFoundError(f"sample {sample.sample_id} has no input tensor")
    try:
        return read_tensor(blob_dir, sample.inputs[0])
    except (OSError, ValueError, KeyError) as err:
        raise NotFoundError(
            f"the input of sample {sample.sample_id} cannot be read from {blob_dir}: {err}"
        ) from err


def version_of_sample(session: Session, *, sample: Sample) -> ModelVersion:
    """The registered model version that produced ``sample``.

    Raises:
        InvalidRequestError: no compile record names its artifact and the model has no such
            registered version (its classes, and so its labels, are unknown).
    """
    if sample.artifact_id:
        record = session.exec(
            select(CompileRecord).where(CompileRecord.artifact_id == sample.artifact_id)
        ).first()
        if record is not None:
            row = crud.get_version_by_id(session, version_id=record.model_version_id)
            if row is not None:
                return row
    try:
        number = int(sample.version)
    except ValueError:
        number = -1
    row = crud.get_version(session, model_name=sample.model, version=number)
    if row is None:
        raise InvalidRequestError(
            f"sample {sample.sample_id} comes from model {sample.model!r} version "
            f"{sample.version!r} (artifact {sample.artifact_id}), which the registry does not "
            "know; only samples of registered model versions can be labeled"
        )
    return row


# ---------------------------------------------------------------- tasks


class TaskViews:
    """Builds :class:`LabelTaskPublic` views, reading each model version once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._versions: dict[int, ModelVersion | None] = {}

    def version(self, version_id: int) -> ModelVersion | None:
        """The model version row (cached)."""
        if version_id not in self._versions:
            self._versions[version_id] = crud.get_version_by_id(self.session, version_id=version_id)
        return self._versions[version_id]

    def public(self, task: LabelTask) -> LabelTaskPublic:
        """The API view of ``task`` (with its version number and allowed labels)."""
        row = self.version(task.model_version_id)
        data = task.model_dump(warnings=False)
        data["version"] = row.version if row is not None else None
        data["classes"] = list(row.classes) if row is not None else []
        return LabelTaskPublic.model_validate(data)


def create_tasks(
    session: Session,
    *,
    sample_ids: Sequence[str] | None = None,
    alert_id: int | None = None,
    reason: str | None = None,
) -> tuple[list[LabelTask], int]:
    """Label tasks for a selection of samples or a drift alert's samples.

    Returns:
        The tasks created and how many samples already had one.

    Raises:
        NotFoundError: an unknown alert, or sample ids never ingested (all named).
        InvalidRequestError: a sample of a model version the registry does not know.
    """
    source: str
    if alert_id is not None:
        alert = session.get(DriftAlert, alert_id)
        if alert is None:
            raise NotFoundError(f"no drift alert {alert_id}; list them with GET /alerts")
        samples = alert_samples(session, alert=alert)
        reason = reason or "drifted_window"
        source = f"alert {alert_id}"
    else:
        wanted = list(dict.fromkeys(sample_ids or []))
        found = find_samples(session, sample_ids=wanted)
        missing = [s for s in wanted if s not in found]
        if missing:
            shown = ", ".join(missing[:20]) + (
                f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            raise NotFoundError(f"no captured sample(s) {shown}; list them with GET /samples")
        samples = [found[s] for s in wanted]
        source = "selection"
    query = select(LabelTask.sample_id).where(
        col(LabelTask.sample_id).in_([s.sample_id for s in samples])
    )
    existing = set(session.exec(query))
    created: list[LabelTask] = []
    for sample in samples:
        if sample.sample_id in existing:
            continue
        version = version_of_sample(session, sample=sample)
        prediction = None
        if sample.top1 is not None and 0 <= sample.top1 < len(version.classes):
            prediction = version.classes[sample.top1]
        model = session.get(RegisteredModel, version.model_id)
        task = LabelTask(
            sample_id=sample.sample_id,
            device_id=sample.device_id,
            model=model.name if model is not None else sample.model,
            model_version_id=version.id or 0,
            reason=reason or sample.reason,
            prediction=prediction,
            confidence=sample.confidence,
            source=source,
        )
        session.add(task)
        created.append(task)
    session.flush()
    return created, len(existing)


def get_task(session: Session, *, task_id: int) -> LabelTask:
    """The label task ``task_id``.

    Raises:
        NotFoundError: there is none.
    """
    task = session.get(LabelTask, task_id)
    if task is None:
        raise NotFoundError(f"no label task {task_id}; list them with GET /labeling/tasks")
    return task


def list_tasks(
    session: Session,
    *,
    model: str | None = None,
    state: LabelTaskState | None = None,
    reason: str | None = None,
    device_id: str | None = None,
    model_version_id: int | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[LabelTask], int]:
    """Label tasks, oldest first, filtered."""
    query = select(LabelTask)
    if model is not None:
        query = query.where(LabelTask.model == model)
    if state is not None:
        query = query.where(LabelTask.state == state)
    if reason is not None:
        query = query.where(LabelTask.reason == reason)
    if device_id is not None:
        query = query.where(LabelTask.device_id == device_id)
    if model_version_id is not None:
        query = query.where(LabelTask.model_version_id == model_version_id)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(LabelTask.id)).offset(offset).limit(limit)).all()
    return list(rows), int(count)


def check_label(version: ModelVersion | None, label: str, *, task_id: int | None) -> str:
    """``label`` if it is one of the version's classes.

    Raises:
        InvalidRequestError: naming the label and the classes to choose from.
    """
    classes = list(version.classes) if version is not None else []
    if label not in classes:
        which = f" of task {task_id}" if task_id is not None else ""
        raise InvalidRequestError(
            f"label {label!r}{which} is not a class of the model; choose from: "
            + ", ".join(repr(c) for c in classes)
        )
    return label


def _check_mutable(task: LabelTask) -> None:
    if task.retrain_run_id is not None:
        raise ConflictError(
            f"label task {task.id} was used by retrain run {task.retrain_run_id}; its label "
            "can no longer change"
        )


def label_task(session: Session, *, task: LabelTask, label: str, labeled_by: str) -> LabelTask:
    """Give ``task`` the label ``label`` (one of its model version's classes).

    Raises:
        InvalidRequestError: an unknown class (naming it and the choices).
        ConflictError: a retrain run already used the task.
    """
    check_label(
        crud.get_version_by_id(session, version_id=task.model_version_id), label, task_id=task.id
    )
    _check_mutable(task)
    now = utcnow()
    task.state = LabelTaskState.LABELED
    task.label = label
    task.labeled_by = labeled_by
    task.labeled_at = now
    task.updated_at = now
    session.add(task)
    session.flush()
    return task


def skip_task(session: Session, *, task: LabelTask, labeled_by: str) -> LabelTask:
    """Mark ``task`` skipped (nobody could tell; it is not used for training).

    Raises:
        ConflictError: a retrain run already used the task.
    """
    _check_mutable(task)
    now = utcnow()
    task.state = LabelTaskState.SKIPPED
    task.label = None
    task.labeled_by = labeled_by
    task.labeled_at = now
    task.updated_at = now
    session.add(task)
    session.flush()
    return task


def next_open_task(
    session: Session, *, model: str | None = None, after: int = 0
) -> LabelTask | None:
    """The first open task with an id above ``after`` (then from the start), or None."""
    query = select(LabelTask).where(LabelTask.state == LabelTaskState.OPEN)
    if model is not None:
        query = query.where(LabelTask.model == model)
    later = session.exec(query.where(col(LabelTask.id) > after).order_by(col(LabelTask.id))).first()
    return later or session.exec(query.order_by(col(LabelTask.id))).first()


# ---------------------------------------------------------------- Label Studio


def export_labelstudio(
    session: Session,
    *,
    blob_dir: Path,
    model: str | None = None,
    state: LabelTaskState = LabelTaskState.OPEN,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The tasks (open ones by default) as Label Studio tasks, oldest first."""
    from cloud.dataloop.labelstudio import ExportItem, export_task

    tasks, _ = list_tasks(session, model=model, state=state, limit=limit)
    samples = find_samples(session, sample_ids=[t.sample_id for t in tasks])
    views = TaskViews(session)
    out = []
    for task in tasks:
        sample = samples.get(task.sample_id)
        if sample is None:
            raise NotFoundError(f"sample {task.sample_id} of label task {task.id} is gone")
        version = views.version(task.model_version_id)
        out.append(
            export_task(
                ExportItem(
                    task_id=task.id or 0,
                    sample_id=task.sample_id,
                    model=task.model,
                    version=version.version if version is not None else 0,
                    device_id=task.device_id,
                    reason=task.reason,
                    prediction=task.prediction,
                    confidence=task.confidence,
                    inputs=sample_input(blob_dir, sample),
                )
            )
        )
    return out


def import_labelstudio(session: Session, *, payload: Any) -> LabelStudioImportResult:
    """Apply a Label Studio JSON export: labels and skips, all or nothing, idempotently.

    Raises:
        InvalidRequestError: a malformed export, unknown task ids or labels that are not
            classes of the task's model (every problem named); nothing is changed then.
        ConflictError: a task whose label would change was already used by a retrain run.
    """
    from cloud.dataloop.labeling_models import LabelStudioImportResult
    from cloud.dataloop.labelstudio import parse_export

    items: list[ImportedLabel] = parse_export(payload)
    total = len(payload) if isinstance(payload, list) else 0
    tasks = {
        t.id: t
        for t in session.exec(
            select(LabelTask).where(col(LabelTask.id).in_([i.task_id for i in items]))
        )
    }
    views = TaskViews(session)
    errors: list[str] = []
    for item in items:
        task = tasks.get(item.task_id)
        where = f"task #{item.position} (edgeloop_task_id {item.task_id})"
        if task is None:
            errors.append(f"{where}: no such label task")
            continue
        if item.label is not None:
            try:
                check_label(views.version(task.model_version_id), item.label, task_id=task.id)
            except InvalidRequestError as err:
                errors.append(f"{where}: annotations.result.value.choices: {err}")
                continue
        changes = (item.label, LabelTaskState.LABELED if item.label else LabelTaskState.SKIPPED)
        if task.retrain_run_id is not None and (task.label, task.state) != changes:
            errors.append(
                f"{where}: already used by retrain run {task.retrain_run_id}; cannot change"
            )
    if errors:
        raise InvalidRequestError(
            "Label Studio import refused, nothing applied: " + "; ".join(errors[:20])
        )
    labeled = unchanged = skipped = 0
    models: set[str] = set()
    for item in items:
        task = tasks[item.task_id]
        if item.label is None:
            if task.state == LabelTaskState.SKIPPED:
                unchanged += 1
                continue
            skip_task(session, task=task, labeled_by=item.labeled_by)
            skipped += 1
        elif task.state == LabelTaskState.LABELED and task.label == item.label:
            unchanged += 1
            continue
        else:
            label_task(session, task=task, label=item.label, labeled_by=item.labeled_by)
            labeled += 1
        models.add(task.model)
    return LabelStudioImportResult(
        labeled=labeled,
        unchanged=unchanged,
        skipped=skipped,
        unannotated=total - len(items),
        models=sorted(models),
    )


# ---------------------------------------------------------------- for retraining


def labeled_dataset(
    session: Session,
    *,
    blob_dir: Path,
    tasks: Iterable[LabelTask],
    classes: Sequence[str],
    input_shape: Sequence[int],
) -> ArrayDataset:
    """The labeled tasks' inputs (reshaped to ``input_shape``) and labels (indices into
    ``classes``).

    Raises:
        DatasetError: an input whose size does not fit ``input_shape``, or a label that is
            not in ``classes``.
    """
    from cloud.datasets import ArrayDataset

    tasks = [t for t in tasks if t.state == LabelTaskState.LABELED and t.label is not None]
    samples = find_samples(session, sample_ids=[t.sample_id for t in tasks])
    shape = tuple(int(d) for d in input_shape)
    xs: list[npt.NDArray[np.float32]] = []
    ys: list[int] = []
    for task in tasks:
        sample = samples.get(task.sample_id)
        if sample is None:
            raise DatasetError(f"sample {task.sample_id} of label task {task.id} is gone")
        x = np.asarray(sample_input(blob_dir, sample), dtype=np.float32)
        if x.size != int(np.prod(shape)):
            raise DatasetError(
                f"sample {task.sample_id} (task {task.id}) has input shape {list(x.shape)}, "
                f"which does not fit the model's input {list(shape)}"
            )
        if task.label not in classes:
            raise DatasetError(
                f"label {task.label!r} of task {task.id} is not one of {list(classes)}"
            )
        xs.append(x.reshape(shape))
        ys.append(list(classes).index(task.label or ""))
    x_all = np.stack(xs) if xs else np.zeros((0, *shape), dtype=np.float32)
    return ArrayDataset(
        np.ascontiguousarray(x_all, dtype=np.float32),
        np.asarray(ys, dtype=np.int64),
        tuple(classes),
    )

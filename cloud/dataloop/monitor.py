"""Drift monitoring: score stored sketch windows, keep alerts, tell the fleet.

For each pending sketch (:class:`~cloud.dataloop.models.Sketch`) the monitor

1. finds the model version the device ran: the sketch's artifact id → the newest
   :class:`~cloud.models.CompileRecord` of it → its :class:`~cloud.models.ModelVersion`
   (without an artifact id: the registered model of that name and the integer version);
2. loads that version's :class:`~cloud.baseline.TrainingBaseline` and checks the device
   sketched on the baseline's spec (the sha256 of the spec's JSON, as the agent computes it):
   counts on other edges cannot be compared;
3. scores the window (:func:`cloud.drift.score_window`) under the model's
   :class:`~cloud.dataloop.models.DriftPolicy` (default: PSI, 0.25, 30 samples) and stores a
   :class:`~cloud.dataloop.models.DriftScore`; at or above the threshold also a
   :class:`~cloud.dataloop.models.DriftAlert`.

A sketch that cannot be scored is marked ``skipped`` with the reason (and never retried);
windows below ``min_samples`` likewise. After the scores are committed, each is posted to
the fleet (``POST /devices/{id}/drift``, the rollout planner's ``max_drift`` gate reads it)
through a :class:`DriftSink`, and each new alert to the policy's webhook; failures of
either are logged and recorded on the row (``fleet_status``, ``webhook_status``), never
fatal. One commit per sketch: two consumers racing on one sketch leave one score.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from agent.sketches import SketchCounts
from cloud.baseline import TrainingBaseline, load_baseline
from cloud.dataloop.models import (
    DriftAggregatePublic,
    DriftAlert,
    DriftAlertPublic,
    DriftPolicy,
    DriftPolicyPublic,
    DriftPolicyUpdate,
    DriftScore,
    DriftScorePublic,
    Sketch,
    default_policy,
)
from cloud.drift import DEFAULT_THRESHOLDS, DriftError, merge_counts, score_window
from cloud.errors import CloudError, InvalidRequestError, NotFoundError
from cloud.models import CompileRecord, ModelVersion, RegisteredModel, Stage
from fleet.models import utcnow

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fleet.sdk import FleetClient

log = logging.getLogger(__name__)

#: Called with (url, alert JSON); returns what happened ("HTTP 200", "error: ...").
Webhook = Callable[[str, dict[str, Any]], str]


class DriftSink(Protocol):
    """Where scores go besides the database (the fleet API)."""

    def post_drift(self, device_id: str, body: dict[str, Any]) -> None:
        """Record ``body`` (the fleet's ``DriftScoreCreate``) for ``device_id``; raise on
        failure."""


class FleetDriftSink:
    """Posts scores to the fleet API's ``POST /devices/{id}/drift`` over a :class:`FleetClient`'s
    HTTP session (the SDK has no drift method yet), so its auth, timeout and errors apply."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client

    def post_drift(self, device_id: str, body: dict[str, Any]) -> None:
        """Post one score (raises :class:`fleet.sdk.FleetAPIError` on failure)."""
        self.client._request("POST", f"/devices/{quote(device_id, safe='')}/drift", json=body)


def http_webhook(timeout_s: float = 5.0) -> Webhook:
    """A webhook that POSTs the alert as JSON with ``timeout_s``; never raises."""

    def post(url: str, payload: dict[str, Any]) -> str:
        import httpx

        try:
            response = httpx.post(url, json=payload, timeout=timeout_s)
        except httpx.HTTPError as err:
            log.warning("alert webhook %s failed: %s", url, err)
            return f"error: {type(err).__name__}: {err}"[:500]
        if response.is_error:
            log.warning("alert webhook %s answered HTTP %d", url, response.status_code)
        return f"HTTP {response.status_code}"

    return post


def spec_digest(baseline: TrainingBaseline) -> str:
    """The sha256 the agent puts in ``DriftSketch.spec_sha256`` for the baseline's spec."""
    return hashlib.sha256(baseline.sketch.model_dump_json().encode()).hexdigest()


# ---------------------------------------------------------------- lookups


def resolve_version(
    session: Session, *, model: str, version: str, artifact_id: str | None
) -> ModelVersion | None:
    """The registry's version a device ran: by artifact id, else by model name and version."""
    if artifact_id:
        record = session.exec(
            select(CompileRecord)
            .where(CompileRecord.artifact_id == artifact_id)
            .order_by(col(CompileRecord.id).desc())
        ).first()
        if record is not None:
            return session.get(ModelVersion, record.model_version_id)
    if not version.isdigit():
        return None
    return session.exec(
        select(ModelVersion)
        .join(RegisteredModel, col(RegisteredModel.id) == col(ModelVersion.model_id))
        .where(RegisteredModel.name == model, ModelVersion.version == int(version))
    ).first()


def model_of(session: Session, version: ModelVersion) -> RegisteredModel:
    """The registered model of ``version``."""
    model = session.get(RegisteredModel, version.model_id)
    assert model is not None
    return model


def policy_for(session: Session, *, model: RegisteredModel) -> DriftPolicyPublic:
    """The model's stored drift policy, or the default."""
    row = session.exec(select(DriftPolicy).where(DriftPolicy.model_id == model.id)).first()
    if row is None:
        return default_policy(model.name)
    return DriftPolicyPublic(
        model=model.name,
        metric=row.metric,
        threshold=row.threshold,
        min_samples=row.min_samples,
        webhook_url=row.webhook_url,
        default=False,
    )


def set_policy(
    session: Session, *, model: RegisteredModel, update: DriftPolicyUpdate
) -> DriftPolicyPublic:
    """Store the model's drift policy (flushed, not committed)."""
    row = session.exec(select(DriftPolicy).where(DriftPolicy.model_id == model.id)).first()
    threshold = DEFAULT_THRESHOLDS[update.metric] if update.threshold is None else update.threshold
    if row is None:
        assert model.id is not None
        row = DriftPolicy(
            model_id=model.id,
            metric=update.metric,
            threshold=threshold,
            min_samples=update.min_samples,
        )
    row.metric = update.metric
    row.threshold = threshold
    row.min_samples = update.min_samples
    row.webhook_url = update.webhook_url
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return policy_for(session, model=model)


def version_for(session: Session, *, model: RegisteredModel, version: int | None) -> ModelVersion:
    """Version ``version`` of ``model``; None: production, else the newest.

    Raises:
        NotFoundError: no such version, or the model has none.
    """
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    if version is not None:
        row = session.exec(query.where(ModelVersion.version == version)).first()
        if row is None:
            raise NotFoundError(
                f"model {model.name!r} has no version {version}; list them with "
                f"GET /models/{model.name}/versions"
            )
        return row
    row = session.exec(query.where(ModelVersion.stage == Stage.PRODUCTION)).first()
    row = row or session.exec(query.order_by(col(ModelVersion.version).desc())).first()
    if row is None:
        raise NotFoundError(f"model {model.name!r} has no versions yet")
    return row


# ---------------------------------------------------------------- scoring


@dataclass
class MonitorResult:
    """What one :meth:`Monitor.score_pending` did."""

    scored: int = 0
    skipped: int = 0
    alerts: int = 0


@dataclass
class _FollowUp:
    score_id: int
    device_id: str
    body: dict[str, Any] | None
    alert_id: int | None
    alert_json: dict[str, Any] | None
    webhook_url: str | None


class Monitor:
    """Scores pending sketches; posts scores to a :class:`DriftSink` and alerts to webhooks."""

    def __init__(
        self,
        *,
        sink: DriftSink | None = None,
        webhook: Webhook | None = None,
        load: Callable[[Path], TrainingBaseline] = load_baseline,
    ) -> None:
        self.sink = sink
        self.webhook = webhook or http_webhook()
        self._load = load
        self._baselines: dict[str, TrainingBaseline] = {}

    def baseline(self, version: ModelVersion) -> TrainingBaseline:
        """The version's baseline (cached by path).

        Raises:
            CloudError: missing or invalid baseline file.
        """
        path = version.baseline_path
        if path not in self._baselines:
            self._baselines[path] = self._load(Path(path))
        return self._baselines[path]

    def score_pending(
        self, engine: Engine, *, sketch_ids: list[str] | None = None, limit: int = 1000
    ) -> MonitorResult:
        """Score pending sketches (only ``sketch_ids`` when given), oldest first."""
        result = MonitorResult()
        follow_ups: list[_FollowUp] = []
        with Session(engine, expire_on_commit=False) as session:
            query = select(Sketch).where(Sketch.status == "pending")
            if sketch_ids is not None:
                query = query.where(col(Sketch.sketch_id).in_(sketch_ids))
            rows = session.exec(query.order_by(col(Sketch.id)).limit(limit)).all()
            for row in rows:
                try:
                    follow_up = self._score(session, row)
                    session.commit()
                except IntegrityError:  # another consumer scored it first
                    session.rollback()
                    continue
                if follow_up is None:
                    result.skipped += 1
                    continue
                result.scored += 1
                result.alerts += follow_up.alert_id is not None
                follow_ups.append(follow_up)
            for item in follow_ups:
                self._follow_up(session, item)
        return result

    def _skip(self, row: Sketch, reason: str) -> None:
        log.info("sketch %s of %s not scored: %s", row.sketch_id, row.device_id, reason)
        row.status = "skipped"
        row.status_reason = reason

    def _score(self, session: Session, row: Sketch) -> _FollowUp | None:
        version = resolve_version(
            session, model=row.model, version=row.version, artifact_id=row.artifact_id
        )
        session.add(row)
        if version is None:
            self._skip(
                row,
                f"no model version for artifact {row.artifact_id!r} (model {row.model!r} "
                f"version {row.version!r}) in the registry",
            )
            return None
        row.model_version_id = version.id
        model = model_of(session, version)
        try:
            baseline = self.baseline(version)
        except CloudError as err:
            self._skip(row, f"model {model.name!r} v{version.version}: {err}")
            return None
        if row.spec_sha256 != spec_digest(baseline):
            self._skip(
                row,
                f"sketched on spec {row.spec_sha256[:12]}, not the baseline's "
                f"{spec_digest(baseline)[:12]} of {model.name!r} v{version.version}",
            )
            return None
        policy = policy_for(session, model=model)
        if row.n_samples < policy.min_samples:
            self._skip(row, f"{row.n_samples} samples < min_samples {policy.min_samples}")
            return None
        try:
            counts = SketchCounts.model_validate(row.counts)
            drift = score_window(baseline, counts, metric=policy.metric, threshold=policy.threshold)
        except (DriftError, ValueError) as err:
            self._skip(row, f"cannot score: {err}")
            return None
        assert version.id is not None and row.id is not None
        score = DriftScore(
            sketch_id=row.id,
            device_id=row.device_id,
            model=model.name,
            model_version_id=version.id,
            artifact_id=row.artifact_id,
            window_start=row.window_start,
            window_end=row.window_end,
            n_samples=row.n_samples,
            metric=drift.metric,
            score=drift.score,
            threshold=drift.threshold,
            drifted=drift.drifted,
            metrics=drift.metrics,
            drifted_features=drift.drifted_features,
        )
        row.status = "scored"
        row.status_reason = None
        session.add(score)
        session.flush()
        assert score.id is not None
        alert: DriftAlert | None = None
        if drift.drifted:
            alert = DriftAlert(
                score_id=score.id,
                device_id=row.device_id,
                model=model.name,
                model_version_id=version.id,
                metric=drift.metric,
                score=drift.score,
                threshold=drift.threshold,
                drifted_features=drift.drifted_features,
                window_start=row.window_start,
                window_end=row.window_end,
            )
            session.add(alert)
            session.flush()
        body = None
        if row.artifact_id:
            body = {
                "model_name": row.model,
                "artifact_id": row.artifact_id,
                "metric": drift.metric,
                "score": drift.score,
                "samples": row.n_samples,
                "window_start": row.window_start.isoformat(),
                "window_end": row.window_end.isoformat(),
            }
        return _FollowUp(
            score_id=score.id,
            device_id=row.device_id,
            body=body,
            alert_id=alert.id if alert else None,
            alert_json=(
                alert_public(session, alert).model_dump(mode="json") if alert is not None else None
            ),
            webhook_url=policy.webhook_url,
        )

    def _follow_up(self, session: Session, item: _FollowUp) -> None:
        score = session.get(DriftScore, item.score_id)
        assert score is not None
        if self.sink is None:
            score.fleet_status = "no fleet configured"
        elif item.body is None:
            score.fleet_status = "not posted: the sketch has no artifact id"
        else:
            try:
                self.sink.post_drift(item.device_id, item.body)
                score.fleet_status = "posted"
            except Exception as err:  # the fleet may be down or refuse; never fatal
                log.warning("posting drift of %s to the fleet failed: %s", item.device_id, err)
                score.fleet_status = f"error: {err}"[:1000]
        session.add(score)
        if item.alert_id is not None and item.webhook_url and item.alert_json is not None:
            alert = session.get(DriftAlert, item.alert_id)
            assert alert is not None
            alert.webhook_status = self.webhook(item.webhook_url, item.alert_json)
            session.add(alert)
        session.commit()


# ---------------------------------------------------------------- queries (the API's)


def _version_numbers(session: Session, ids: set[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows = session.exec(select(ModelVersion).where(col(ModelVersion.id).in_(ids))).all()
    return {r.id: r.version for r in rows if r.id is not None}


def score_public(session: Session, row: DriftScore, versions: dict[int, int]) -> DriftScorePublic:
    """The API view of a score (``versions``: model version id → version number)."""
    return DriftScorePublic.model_validate(
        row, update={"model_version": versions[row.model_version_id]}
    )


def alert_public(session: Session, row: DriftAlert) -> DriftAlertPublic:
    """The API view of an alert."""
    versions = _version_numbers(session, {row.model_version_id})
    return DriftAlertPublic.model_validate(
        row, update={"model_version": versions[row.model_version_id]}
    )


def list_scores(
    session: Session,
    *,
    device: str | None = None,
    devices: list[str] | None = None,
    model: str | None = None,
    version: int | None = None,
    drifted: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[DriftScorePublic], int]:
    """Scores, newest window first, filtered by device(s), model (and version), window."""
    query = select(DriftScore)
    if device is not None:
        query = query.where(DriftScore.device_id == device)
    if devices:
        query = query.where(col(DriftScore.device_id).in_(devices))
    if model is not None:
        query = query.where(DriftScore.model == model)
        if version is not None:
            query = query.join(
                ModelVersion, col(ModelVersion.id) == col(DriftScore.model_version_id)
            ).where(ModelVersion.version == version)
    if drifted is not None:
        query = query.where(DriftScore.drifted == drifted)
    if since is not None:
        query = query.where(DriftScore.window_end >= since)
    if until is not None:
        query = query.where(DriftScore.window_start <= until)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(DriftScore.window_end).desc(), col(DriftScore.id).desc())
        .offset(offset)
        .limit(limit)
    ).all()
    versions = _version_numbers(session, {r.model_version_id for r in rows})
    return [score_public(session, r, versions) for r in rows], int(count)


def aggregate(
    session: Session,
    *,
    model: RegisteredModel,
    version: int | None = None,
    devices: list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    monitor: Monitor | None = None,
) -> DriftAggregatePublic:
    """The scored windows of a model version (of ``devices``, in a time range) merged into
    one and scored under the model's policy.

    Raises:
        NotFoundError: no such version, or no scored window matches.
        InvalidRequestError: the windows cannot be merged or scored.
    """
    row = version_for(session, model=model, version=version)
    query = select(Sketch).where(Sketch.model_version_id == row.id, Sketch.status == "scored")
    if devices:
        query = query.where(col(Sketch.device_id).in_(devices))
    if since is not None:
        query = query.where(Sketch.window_end >= since)
    if until is not None:
        query = query.where(Sketch.window_start <= until)
    sketches = session.exec(query).all()
    if not sketches:
        raise NotFoundError(
            f"no scored drift windows of {model.name!r} v{row.version}"
            + (f" from devices {', '.join(devices)}" if devices else "")
            + " in that time range"
        )
    policy = policy_for(session, model=model)
    baseline = (monitor or Monitor()).baseline(row)
    try:
        merged = merge_counts([SketchCounts.model_validate(s.counts) for s in sketches])
        drift = score_window(baseline, merged, metric=policy.metric, threshold=policy.threshold)
    except DriftError as err:
        raise InvalidRequestError(f"cannot aggregate the windows: {err}") from err
    return DriftAggregatePublic(
        model=model.name,
        model_version=row.version,
        devices=sorted({s.device_id for s in sketches}),
        windows=len(sketches),
        window_start=min(s.window_start for s in sketches),
        window_end=max(s.window_end for s in sketches),
        n_samples=drift.n_samples,
        metric=drift.metric,
        score=drift.score,
        threshold=drift.threshold,
        drifted=drift.drifted,
        metrics=drift.metrics,
        drifted_features=drift.drifted_features,
    )


def list_alerts(
    session: Session,
    *,
    acknowledged: bool | None = None,
    device: str | None = None,
    model: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[DriftAlertPublic], int]:
    """Alerts, newest first."""
    query = select(DriftAlert)
    if acknowledged is not None:
        query = query.where(
            col(DriftAlert.acknowledged_at).is_not(None)
            if acknowledged
            else col(DriftAlert.acknowledged_at).is_(None)
        )
    if device is not None:
        query = query.where(DriftAlert.device_id == device)
    if model is not None:
        query = query.where(DriftAlert.model == model)
    count = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(DriftAlert.id).desc()).offset(offset).limit(limit)).all()
    return [alert_public(session, r) for r in rows], int(count)


def acknowledge(session: Session, *, alert_id: int, note: str | None) -> DriftAlertPublic:
    """Acknowledge an alert (flushed, not committed); acknowledging twice keeps the first time.

    Raises:
        NotFoundError: no such alert.
    """
    row = session.get(DriftAlert, alert_id)
    if row is None:
        raise NotFoundError(f"no alert {alert_id}; list them with GET /alerts")
    if row.acknowledged_at is None:
        row.acknowledged_at = utcnow()
        row.ack_note = note
        session.add(row)
        session.flush()
    return alert_public(session, row)

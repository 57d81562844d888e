"""Drift scores in the database: what the data loop posts and what the rollout gate reads.

The cloud side (issue "capture and drift") scores each device's recent inputs to an artifact
against its training data and posts the score (``POST /devices/{id}/drift``); the executor
feeds the latest score of each device's new artifact to the planner's ``max_drift`` gate
(:func:`fleet.rollout.gate_violations`), the device state shows the latest ones, and
``/metrics`` the highest latest score per model and metric.

Helpers are keyword-only and never commit (the route or the executor owns the transaction).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlmodel import Session, col, select

from fleet.errors import InvalidRequestError
from fleet.models import Artifact, Device, DriftScore, DriftScoreCreate


def record_score(session: Session, *, device: Device, score_in: DriftScoreCreate) -> DriftScore:
    """Store a score of ``device`` (added and flushed, not committed).

    Raises:
        InvalidRequestError: the artifact is not in the device's organization, or is another
            model than ``model_name``.
    """
    artifact = session.exec(
        select(Artifact).where(
            Artifact.org_id == device.org_id, Artifact.artifact_id == score_in.artifact_id
        )
    ).first()
    if artifact is None:
        raise InvalidRequestError(
            f"no artifact {score_in.artifact_id!r} in the organization; upload it first or "
            "list them with GET /artifacts"
        )
    if artifact.model_name != score_in.model_name:
        raise InvalidRequestError(
            f"artifact {score_in.artifact_id!r} is model {artifact.model_name!r}, "
            f"not {score_in.model_name!r}"
        )
    score = DriftScore.model_validate(
        score_in, update={"org_id": device.org_id, "device_id": device.device_id}
    )
    session.add(score)
    session.flush()
    return score


def _newest_first(rows: Sequence[DriftScore]) -> list[DriftScore]:
    return sorted(rows, key=lambda r: (r.window_end, r.created_at), reverse=True)


def device_scores(session: Session, *, device_id: str) -> list[DriftScore]:
    """The latest score per (model, artifact, metric) of a device, sorted by those keys."""
    rows = session.exec(select(DriftScore).where(DriftScore.device_id == device_id)).all()
    latest: dict[tuple[str, str, str], DriftScore] = {}
    for row in _newest_first(rows):
        latest.setdefault((row.model_name, row.artifact_id, row.metric), row)
    return [latest[key] for key in sorted(latest)]


def latest_scores(
    session: Session, *, org_id: uuid.UUID, model_name: str
) -> dict[tuple[str, str], DriftScore]:
    """The latest score (any metric; by window end) per (device, artifact) of one model."""
    rows = session.exec(
        select(DriftScore).where(DriftScore.org_id == org_id, DriftScore.model_name == model_name)
    ).all()
    latest: dict[tuple[str, str], DriftScore] = {}
    for row in _newest_first(rows):
        latest.setdefault((row.device_id, row.artifact_id), row)
    return latest


def highest_latest(session: Session) -> dict[tuple[str, str], float]:
    """Per (model, metric), the highest of the devices' latest scores (all organizations)."""
    rows = session.exec(select(DriftScore).order_by(col(DriftScore.created_at))).all()
    latest: dict[tuple[str, str, str, str], DriftScore] = {}
    for row in _newest_first(rows):
        latest.setdefault((row.device_id, row.model_name, row.artifact_id, row.metric), row)
    highest: dict[tuple[str, str], float] = {}
    for row in latest.values():
        key = (row.model_name, row.metric)
        highest[key] = max(highest.get(key, 0.0), row.score)
    return highest


def delete_device_scores(session: Session, *, device_id: str) -> None:
    """Remove a deleted device's scores (a re-registration starts afresh)."""
    for row in session.exec(select(DriftScore).where(DriftScore.device_id == device_id)).all():
        session.delete(row)

"""Database reads of the dashboard, always scoped to one organization (the adapter).

Each function takes the caller's ``org_id`` and never returns another organization's row:
the dashboard's tenant isolation rests on these ``WHERE org_id = ...`` clauses exactly as the
API's rests on :mod:`fleet.crud`. Helpers are keyword-only and read-only.
"""

from __future__ import annotations

import uuid
from collections import Counter

from sqlmodel import Session, col, select

from fleet import deployments
from fleet.dashboard.views import DeviceRow, DriftPoint, reported_versions
from fleet.models import Artifact, Deployment, Device, DeviceReport, DriftScore, Group

MAX_DRIFT_POINTS = 5000


def device_rows(session: Session, *, org_id: uuid.UUID) -> list[DeviceRow]:
    """Every device of the organization with its last report, by id."""
    devices = session.exec(
        select(Device).where(Device.org_id == org_id).order_by(col(Device.device_id))
    ).all()
    reports = {
        r.device_id: r
        for r in session.exec(select(DeviceReport).where(DeviceReport.org_id == org_id)).all()
    }
    groups = {g.id: g.name for g in session.exec(select(Group).where(Group.org_id == org_id)).all()}
    rows = []
    for d in devices:
        report = reports.get(d.device_id)
        diff = deployments.state_diff(report)
        rows.append(
            DeviceRow(
                device_id=d.device_id,
                profile=d.profile,
                group=groups.get(d.group_id) if d.group_id is not None else None,
                revoked=d.revoked,
                online=report.online if report is not None else False,
                last_seen=report.last_seen if report is not None else None,
                models=reported_versions(report.reported_models) if report is not None else (),
                in_sync=all(x.in_sync for x in diff),
            )
        )
    return rows


def report_of(session: Session, *, org_id: uuid.UUID, device_id: str) -> DeviceReport | None:
    """The device's last report, if it is the organization's."""
    report = deployments.get_report(session, device_id=device_id)
    return report if report is not None and report.org_id == org_id else None


def group_name(session: Session, *, org_id: uuid.UUID, group_id: uuid.UUID | None) -> str | None:
    """The name of the organization's group ``group_id``."""
    if group_id is None:
        return None
    group = session.get(Group, group_id)
    return group.name if group is not None and group.org_id == org_id else None


def drift_points(
    session: Session,
    *,
    org_id: uuid.UUID,
    device_id: str | None = None,
    model_name: str | None = None,
    limit: int = MAX_DRIFT_POINTS,
) -> list[DriftPoint]:
    """The organization's most recent drift scores (newest ``limit``), with model versions."""
    query = select(DriftScore).where(DriftScore.org_id == org_id)
    if device_id:
        query = query.where(DriftScore.device_id == device_id)
    if model_name:
        query = query.where(DriftScore.model_name == model_name)
    rows = session.exec(query.order_by(col(DriftScore.window_end).desc()).limit(limit)).all()
    ids = {r.artifact_id for r in rows}
    versions = {
        a.artifact_id: a.model_version
        for a in session.exec(
            select(Artifact).where(Artifact.org_id == org_id, col(Artifact.artifact_id).in_(ids))
        ).all()
    }
    return [
        DriftPoint(
            device_id=r.device_id,
            model_name=r.model_name,
            model_version=versions.get(r.artifact_id, r.artifact_id[:12]),
            metric=r.metric,
            score=r.score,
            samples=r.samples,
            window_end=r.window_end,
        )
        for r in rows
    ]


def drift_choices(session: Session, *, org_id: uuid.UUID) -> tuple[list[str], list[str]]:
    """Device ids and model names that have drift scores in the organization."""
    rows = session.exec(
        select(DriftScore.device_id, DriftScore.model_name)
        .where(DriftScore.org_id == org_id)
        .distinct()
    ).all()
    return sorted({r[0] for r in rows}), sorted({r[1] for r in rows})


def deployment_phases(session: Session, *, org_id: uuid.UUID) -> dict[str, int]:
    """Deployments of the organization per phase."""
    phases = session.exec(select(Deployment.phase).where(Deployment.org_id == org_id)).all()
    return dict(Counter(phases))


def org_device_ids(session: Session, *, org_id: uuid.UUID) -> set[str]:
    """Ids of the organization's devices (revoked ones included)."""
    return set(session.exec(select(Device.device_id).where(Device.org_id == org_id)).all())

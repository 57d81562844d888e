"""Liveness (``/healthz``: the database answers); no token."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from cloud.api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    """``{"status": "ok"}`` when the database answers."""
    session.connection().execute(text("SELECT 1"))
    return {"status": "ok"}

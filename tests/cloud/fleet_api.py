"""A real fleet API (``fleet.api.main.create_app`` under uvicorn on a local socket) for the
cloud's compile-job and lineage tests, with an admin key and helpers to play the executor."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlmodel import Session

from fleet import deployments
from fleet.api.bootstrap import create_admin_key
from fleet.api.main import create_app
from fleet.api.settings import ApiSettings
from fleet.broker_auth import MosquittoPasswordFile

warnings.filterwarnings("ignore", message=r".*httpx.*starlette\.testclient", category=Warning)

from tests.fleet.api.test_api_cli import LiveServer  # noqa: E402

ORG = "acme"


@dataclass(frozen=True)
class FleetApi:
    """A running fleet API: its URL, an admin token and its artifact store directory."""

    url: str
    token: str
    app: FastAPI
    store: Path

    def report(
        self,
        device_id: str,
        *,
        reported: list[dict[str, Any]] | None = None,
        desired: dict[str, str] | None = None,
        online: bool = True,
    ) -> None:
        """Write a device's reported/desired models as the executor does from heartbeats."""
        with Session(self.app.state.engine) as session:
            org_id = _org_id(session)
            row = deployments.ensure_report(session, org_id=org_id, device_id=device_id)
            row.online = online
            if reported is not None:
                row.reported_models = reported
            if desired is not None:
                row.desired_models = desired
            session.add(row)
            session.commit()


def _org_id(session: Session) -> Any:
    from fleet import crud

    org = crud.get_organization_by_name(session, name=ORG)
    assert org is not None
    return org.id


@contextmanager
def running_fleet_api(root: Path, public_key: Path) -> Iterator[FleetApi]:
    """The fleet API on SQLite under ``root``, verifying artifacts with ``public_key``."""
    settings = ApiSettings(
        state_dir=root / "state",
        store=root / "store",
        public_key=public_key,
        database_url=f"sqlite:///{root / 'fleet.db'}",
        max_upload_bytes=64 << 20,
    )
    broker = MosquittoPasswordFile(root / "broker" / "passwd", reload=lambda: None)
    app = create_app(settings, broker_auth=broker)
    with LiveServer(app) as server:
        with Session(app.state.engine) as session:
            key = create_admin_key(session, ORG)
        yield FleetApi(url=server.url, token=key.token, app=app, store=settings.store)

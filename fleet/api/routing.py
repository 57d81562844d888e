"""The route class every fleet router uses: one DB session per request, and the audit log.

:class:`AuditedRoute` opens the request's session (``SessionDep`` hands it out), and after a
mutating call (POST, PUT, PATCH, DELETE) by an authenticated key appends one audit entry in
the caller's organization: actor key id, action (``<tag>.<endpoint>``), target (the path,
or what the route named with ``AuditDep``), result (ok, denied, failed), status and, for
failures, the error message (messages never hold secrets; validation errors are summarised
without the input). A failed call's changes are rolled back before its entry is written.
The route commits its own work; the entry follows in a second transaction of that session
(if it cannot be written, a successful call answers 500 and the error is logged: the entry
is never skipped silently).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fleet import crud
from fleet.api.metrics import ApiMetrics
from fleet.errors import FleetError
from fleet.models import AuditLogCreate

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class AuditContext:
    """What the audit entry of the current request says it was about; a call that changes
    many objects (bulk registration) names each in ``targets`` and gets one entry per target."""

    target: str
    targets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: its API key's public id, organization and scopes."""

    key_id: str
    org_id: uuid.UUID
    scopes: frozenset[str]


def describe_error(err: BaseException) -> tuple[int, str]:
    """The HTTP status and a secret-free message for an exception leaving a route."""
    if isinstance(err, FleetError):
        return err.http_status, str(err)
    if isinstance(err, RequestValidationError):
        parts = []
        for error in err.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg', '')}")
        return 422, "invalid request: " + "; ".join(parts)
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    return 500, f"internal error ({type(err).__name__})"


def _result(status: int) -> str:
    if status < 400:
        return "ok"
    return "denied" if status in (401, 403) else "failed"


class AuditedRoute(APIRoute):
    """An APIRoute that owns the request's session and audits mutating calls."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        audited = bool((self.methods or set()) & MUTATING)
        action = f"{self.tags[0] if self.tags else 'api'}.{self.name}"
        path = self.path

        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            status = 500
            session = Session(request.app.state.engine, expire_on_commit=False)
            request.state.session = session
            request.state.audit = AuditContext(target=request.url.path)
            try:
                try:
                    response = await original(request)
                except Exception as err:
                    status, detail = describe_error(err)
                    await run_in_threadpool(
                        _finish, session, request, action, status, detail, audited, True
                    )
                    raise
                status = response.status_code
                await run_in_threadpool(
                    _finish, session, request, action, status, None, audited, False
                )
                return response
            finally:
                await run_in_threadpool(session.close)
                metrics: ApiMetrics | None = getattr(request.app.state, "metrics", None)
                if metrics is not None:
                    elapsed = time.perf_counter() - started
                    metrics.observe(
                        route=path, method=request.method, status=status, seconds=elapsed
                    )

        return handler


def _finish(
    session: Session,
    request: Request,
    action: str,
    status: int,
    detail: str | None,
    audited: bool,
    failed: bool,
) -> None:
    if failed:
        session.rollback()
    principal: Principal | None = getattr(request.state, "principal", None)
    if not audited or principal is None:
        if audited:
            log.info("%s %s: %d before authentication", request.method, request.url.path, status)
        return
    audit: AuditContext = request.state.audit
    entries = [
        AuditLogCreate(
            actor=principal.key_id,
            action=action[:128],
            target=target[:512],
            result=_result(status),
            status_code=status,
            detail=None if detail is None else detail[:1024],
        )
        for target in (audit.targets or [audit.target])
    ]
    entry = entries[0]
    try:
        crud.add_audits(session, org_id=principal.org_id, entries=entries)
        session.commit()
    except Exception:
        session.rollback()
        log.exception("could not write the audit entry %s", entry.model_dump())
        if not failed:
            raise

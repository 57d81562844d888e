"""The dashboard's pages and their live JSON views (server-rendered Jinja2, no CDN).

The overview, the devices page and a deployment's page are redrawn in place by
``static/dashboard.js``, which polls their JSON views under ``/dashboard/api/``; each view is
computed by the same function as the page it redraws, so both always show the same thing.

Every page needs a dashboard session: a signed, HttpOnly, ``SameSite=Strict`` cookie naming
the API key the operator signed in with (:mod:`fleet.dashboard.session`). On each request the
key is looked up again, so a revoked key, a deleted organization or a key without
``fleet:read`` ends the session at once; pages redirect to the login form, the JSON views
answer 401. Everything shown is read through :mod:`fleet.dashboard.queries` scoped to the
key's organization (another organization's id answers 404 like a missing one). The audit log
needs ``admin``, as ``GET /audit`` does. The dashboard changes nothing but its own cookie and
the audit entry of a sign-in; a sign-in posted from another site (its ``Origin`` names another
host) is refused, so no site can sign a browser in with the site's own key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from fleet import credentials, crud, deployments, drift, scopes
from fleet.api.deps import _dummy_hash
from fleet.dashboard import queries, views
from fleet.dashboard import session as cookies
from fleet.dashboard.relabel import RelabelError, RelabelSource
from fleet.models import ApiKey, AuditLogCreate, Deployment
from fleet.rollout import Phase
from fleet.scopes import Scope

COOKIE = "edgeloop_dashboard"
HOME = "/dashboard/"
LOGIN = "/dashboard/login"
TEMPLATES = Path(__file__).parent / "templates"
AUDIT_PAGE = 50
DEVICE_PAGE = 200
OVERVIEW_ROLLOUTS = 20  # the newest deployments the overview looks for running ones in
OVERVIEW_DRIFT = 5  # series with the highest latest score shown
OVERVIEW_DRIFT_POINTS = 500  # the newest drift scores those are picked from
TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.ABORTED, Phase.CANCELED, Phase.ROLLED_BACK})

# Served as an application mounted at /dashboard (fleet.dashboard.install), not as routes of
# the API: its pages are no API resources (no OpenAPI entries, no bearer keys, no API metrics).
router = APIRouter(tags=["dashboard"])
templates = Jinja2Templates(directory=TEMPLATES)
templates.env.globals["age"] = views.age
templates.env.globals["series_color"] = views.series_color


class LoginRequired(Exception):
    """No valid dashboard session: pages redirect to the login form, JSON answers 401."""

    def __init__(self, path: str, *, json: bool = False) -> None:
        super().__init__(f"sign in to see {path}")
        self.path = path
        self.json = json


@dataclass(frozen=True)
class Viewer:
    """The signed-in operator: the API key's id, organization and scopes."""

    key_id: str
    org_id: uuid.UUID
    org_name: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return scopes.allows(self.scopes, Scope.ADMIN)


def get_session(request: Request) -> Iterator[Session]:
    """A session on the fleet database for this request."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _secret(request: Request) -> bytes:
    secret: bytes = request.app.state.dashboard_secret
    return secret


def _viewer_of(session: Session, key: ApiKey | None) -> Viewer | None:
    if key is None or key.revoked_at is not None:
        return None
    if not scopes.allows([str(s) for s in key.scopes], Scope.READ):
        return None
    org = crud.get_organization(session, org_id=key.org_id)
    if org is None:
        return None
    return Viewer(
        key_id=key.key_id,
        org_id=org.id,
        org_name=org.name,
        scopes=frozenset(str(s) for s in key.scopes),
    )


def _viewer(request: Request, session: Session, *, json: bool) -> Viewer:
    data = cookies.verify(_secret(request), request.cookies.get(COOKIE), now=time.time())
    viewer = None
    if data is not None:
        viewer = _viewer_of(session, crud.find_api_key(session, key_id=data.key_id))
    if viewer is None:
        raise LoginRequired(request.url.path, json=json)
    return viewer


def get_viewer(request: Request, session: SessionDep) -> Viewer:
    """The signed-in operator of a page (else redirect to the login form)."""
    return _viewer(request, session, json=False)


def get_json_viewer(request: Request, session: SessionDep) -> Viewer:
    """The signed-in operator of a JSON call (else 401)."""
    return _viewer(request, session, json=True)


ViewerDep = Annotated[Viewer, Depends(get_viewer)]
JsonViewerDep = Annotated[Viewer, Depends(get_json_viewer)]


async def handle_login_required(request: Request, err: Exception) -> Response:
    """Redirect to the login form (pages) or answer 401 (JSON)."""
    if isinstance(err, LoginRequired) and err.json:
        return JSONResponse({"detail": "no dashboard session; sign in at /dashboard/login"}, 401)
    path = err.path if isinstance(err, LoginRequired) else HOME
    return RedirectResponse(f"{LOGIN}?next={quote(path)}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only paths of the dashboard itself (no open redirect to another site)."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return HOME


def _render(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    viewer: Viewer | None,
    status_code: int = 200,
) -> HTMLResponse:
    base = {
        "viewer": viewer,
        "now": datetime.now(UTC),
        "cloud_configured": request.app.state.relabel_source is not None,
        "active": name.removesuffix(".html"),
    }
    response = templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status_code
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'none'; form-action 'self'"
    )
    return response


def _not_found(request: Request, viewer: Viewer, message: str) -> HTMLResponse:
    return _render(request, "error.html", {"message": message}, viewer=viewer, status_code=404)


def _json(data: dict[str, Any], *, status_code: int = 200) -> JSONResponse:
    """A live view (or its error) as JSON, never cached."""
    return JSONResponse(data, status_code=status_code, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- login


def _audit(session: Session, org_id: uuid.UUID, entry: AuditLogCreate) -> None:
    crud.add_audit(session, org_id=org_id, entry=entry)
    session.commit()


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002
    """The login form: paste an API key with ``fleet:read``."""
    return _render(request, "login.html", {"next": _safe_next(next), "error": None}, viewer=None)


def _check_token(session: Session, token: str) -> tuple[Viewer | None, str]:
    parsed = credentials.parse_token(token.strip())
    if parsed is None:
        return None, "malformed API key; expected elk_<12 hex digits>_<secret>"
    key = crud.find_api_key(session, key_id=parsed.key_id)
    valid = credentials.verify_secret(
        parsed.secret, key.secret_hash if key is not None else _dummy_hash()
    )
    if key is None or not valid or key.revoked_at is not None:
        return None, f"API key {parsed.key_id!r} is unknown, revoked, or its secret is wrong"
    viewer = _viewer_of(session, key)
    if viewer is None:
        held = ", ".join(sorted(str(s) for s in key.scopes)) or "none"
        return None, f"API key {key.key_id!r} lacks scope 'fleet:read' (it has: {held})"
    return viewer, ""


@router.post("/login")
async def login(request: Request, session: SessionDep) -> Response:
    """Check the posted API key and start a session (an audited ``dashboard.login``)."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
        context = {"next": HOME, "error": f"sign-in posted from another site ({origin}) refused"}
        return _render(request, "login.html", context, viewer=None, status_code=403)
    form = await request.form()
    token = form.get("api_key")
    target = _safe_next(str(form.get("next") or ""))
    if not isinstance(token, str) or not token.strip():
        viewer, error = None, "paste an API key (elk_...) with the fleet:read scope"
    else:
        viewer, error = await run_in_threadpool(_check_token, session, token)
    if viewer is None:
        context = {"next": target, "error": error}
        return _render(request, "login.html", context, viewer=None, status_code=401)
    entry = AuditLogCreate(
        actor=viewer.key_id,
        action="dashboard.login",
        target=f"api-key:{viewer.key_id}",
        result="ok",
        status_code=303,
    )
    await run_in_threadpool(_audit, session, viewer.org_id, entry)
    lifetime = request.app.state.settings.dashboard_session_s
    value = cookies.sign(
        _secret(request), key_id=viewer.key_id, now=time.time(), lifetime_s=lifetime
    )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        value,
        max_age=lifetime,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session (drop the cookie)."""
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return response


# ---------------------------------------------------------------- pages


def _rollout_json(row: Deployment) -> dict[str, Any]:
    public = deployments.to_public(row)
    return {
        "id": str(public.id),
        "name": public.name,
        "model_name": public.model_name,
        "phase": public.phase,
        "stage": public.stage,
        "stages": len(public.stages),
        "devices": len(public.devices),
    }


def overview_view(session: Session, viewer: Viewer, *, now: datetime) -> dict[str, Any]:
    """What the overview shows and its poller redraws: counts, phases, running rollouts,
    the highest latest drift scores and the devices not in their desired state."""
    rows = queries.device_rows(session, org_id=viewer.org_id)
    recent, _ = deployments.list_deployments(
        session, org_id=viewer.org_id, phase=None, offset=0, limit=OVERVIEW_ROLLOUTS
    )
    points = queries.drift_points(session, org_id=viewer.org_id, limit=OVERVIEW_DRIFT_POINTS)
    phases = queries.deployment_phases(session, org_id=viewer.org_id)
    return {
        "counts": views.device_counts(rows),
        "phases": dict(sorted(phases.items())),
        "rollouts": [_rollout_json(d) for d in recent if Phase(d.phase) not in TERMINAL_PHASES],
        "top_drift": [
            views.drift_point_json(p) for p in views.highest_latest(points, limit=OVERVIEW_DRIFT)
        ],
        "out_of_sync": [r.device_id for r in rows if not r.in_sync and not r.revoked],
        "updated_at": now.isoformat(),
    }


@router.get("/")
def overview(request: Request, session: SessionDep, viewer: ViewerDep) -> HTMLResponse:
    """Counts: devices per status, deployments per phase, drift, active rollouts (live)."""
    context = {"live": overview_view(session, viewer, now=datetime.now(UTC))}
    return _render(request, "overview.html", context, viewer=viewer)


@router.get("/api/overview")
def overview_json(session: SessionDep, viewer: JsonViewerDep) -> Response:
    """The overview as JSON (the page polls it)."""
    return _json(overview_view(session, viewer, now=datetime.now(UTC)))


@dataclass(frozen=True)
class DeviceFilters:
    """The devices page's filters (query parameters of the page and of its JSON view)."""

    status: str | None
    profile: str | None
    q: str | None

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status or "", "profile": self.profile or "", "q": self.q or ""}


def get_device_filters(
    status: Annotated[str | None, Query(max_length=16)] = None,
    profile: Annotated[str | None, Query(max_length=128)] = None,
    q: Annotated[str | None, Query(max_length=64)] = None,
) -> DeviceFilters:
    """The devices filters of a request (``status``, ``profile``, ``q``: id contains)."""
    return DeviceFilters(status=status or None, profile=profile or None, q=q or None)


DeviceFiltersDep = Annotated[DeviceFilters, Depends(get_device_filters)]


def devices_view(
    session: Session, viewer: Viewer, filters: DeviceFilters, *, now: datetime
) -> dict[str, Any]:
    """What the devices page lists and its poller redraws: the matching devices (at most
    :data:`DEVICE_PAGE`) as ``rows``, how many are ``shown``, ``more`` not shown, the
    organization's ``total`` and ``profiles``.

    Raises:
        views.FilterError: ``filters.status`` is not a device status.
    """
    rows = queries.device_rows(session, org_id=viewer.org_id)
    matching = views.filter_devices(
        rows, status=filters.status, profile=filters.profile, query=filters.q
    )
    shown = matching[:DEVICE_PAGE]
    data = {
        "rows": [views.device_json(r, now=now) for r in shown],
        "shown": len(shown),
        "more": len(matching) - len(shown),
        "total": len(rows),
        "profiles": sorted({r.profile for r in rows}),
        "updated_at": now.isoformat(),
    }
    return data


@router.get("/devices")
def devices_page(
    request: Request, session: SessionDep, viewer: ViewerDep, filters: DeviceFiltersDep
) -> HTMLResponse:
    """Devices: status, profile, group, reported model versions, last heartbeat; filters (live)."""
    try:
        live = devices_view(session, viewer, filters, now=datetime.now(UTC))
    except views.FilterError as err:
        return _render(request, "error.html", {"message": str(err)}, viewer=viewer, status_code=422)
    context = {
        "live": live,
        "statuses": views.DEVICE_STATUSES,
        "filters": filters.as_dict(),
        "live_url": "/dashboard/api/devices?" + urlencode(filters.as_dict()),
    }
    return _render(request, "devices.html", context, viewer=viewer)


@router.get("/api/devices")
def devices_json(session: SessionDep, viewer: JsonViewerDep, filters: DeviceFiltersDep) -> Response:
    """The devices page's rows as JSON, with the page's filters (the page polls it)."""
    try:
        live = devices_view(session, viewer, filters, now=datetime.now(UTC))
    except views.FilterError as err:
        return _json({"detail": str(err)}, status_code=422)
    return _json(live)


@router.get("/devices/{device_id}")
def device_page(
    request: Request, session: SessionDep, viewer: ViewerDep, device_id: str
) -> HTMLResponse:
    """One device: desired vs reported per model, last heartbeat, latest drift."""
    device = crud.get_device(session, org_id=viewer.org_id, device_id=device_id)
    if device is None:
        return _not_found(
            request, viewer, f"no device {device_id!r} in organization {viewer.org_name!r}"
        )
    report = queries.report_of(session, org_id=viewer.org_id, device_id=device_id)
    context = {
        "device": device,
        "group": queries.group_name(session, org_id=viewer.org_id, group_id=device.group_id),
        "report": report,
        "diff": deployments.state_diff(report),
        "drift": drift.device_scores(session, device_id=device_id),
        "heartbeat": (report.heartbeat or {}) if report is not None else {},
    }
    return _render(request, "device.html", context, viewer=viewer)


@router.get("/deployments")
def deployments_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> HTMLResponse:
    """Deployments, newest first, with overall progress."""
    _, count = deployments.list_deployments(
        session, org_id=viewer.org_id, phase=None, offset=0, limit=1
    )
    paging = views.Page(number=page, size=50, count=count)
    rows, _ = deployments.list_deployments(
        session, org_id=viewer.org_id, phase=None, offset=paging.offset, limit=paging.size
    )
    items = []
    for row in rows:
        public = deployments.to_public(row)
        items.append((public, views.overall_percent(_waves(public))))
    return _render(request, "deployments.html", {"items": items, "page": paging}, viewer=viewer)


def _deployment(session: Session, viewer: Viewer, deployment_id: str) -> Deployment | None:
    try:
        key = uuid.UUID(deployment_id)
    except ValueError:
        return None
    return deployments.get_deployment(session, org_id=viewer.org_id, deployment_id=key)


def _waves(public: Any) -> list[views.WaveView]:
    states = {d.device_id: d.state for d in public.devices}
    # Every policy has a canary (fleet.rollout.Size is at least one device): stage 0.
    return views.waves(public.stages, states, current=public.stage, canary=True)


def live_view(row: Deployment) -> dict[str, Any]:
    """What the deployment page's poller redraws: phase, waves and per-device jobs."""
    public = deployments.to_public(row)
    wave_views = _waves(public)
    return {
        "id": str(public.id),
        "phase": public.phase,
        "terminal": Phase(public.phase) in TERMINAL_PHASES,
        "reason": public.reason,
        "stage": public.stage,
        "percent": views.overall_percent(wave_views),
        "counts": public.counts,
        "waves": [w.as_json() for w in wave_views],
        "devices": [d.model_dump() for d in public.devices],
        "updated_at": public.updated_at.isoformat(),
    }


@router.get("/deployments/{deployment_id}")
def deployment_page(
    request: Request, session: SessionDep, viewer: ViewerDep, deployment_id: str
) -> HTMLResponse:
    """One rollout: per-wave progress and per-device job states, redrawn live."""
    row = _deployment(session, viewer, deployment_id)
    if row is None:
        return _not_found(
            request,
            viewer,
            f"no deployment {deployment_id!r} in organization {viewer.org_name!r}",
        )
    public = deployments.to_public(row)
    context = {"d": public, "live": live_view(row), "waves": _waves(public)}
    return _render(request, "deployment.html", context, viewer=viewer)


@router.get("/api/deployments/{deployment_id}")
def deployment_json(session: SessionDep, viewer: JsonViewerDep, deployment_id: str) -> Response:
    """The live view of one deployment as JSON (the page polls it)."""
    row = _deployment(session, viewer, deployment_id)
    if row is None:
        return _json(
            {"detail": f"no deployment {deployment_id!r} in organization {viewer.org_name!r}"},
            status_code=404,
        )
    return _json(live_view(row))


@router.get("/drift")
def drift_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    device: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    """Drift scores per device and model version over time: a chart and the latest values."""
    points = queries.drift_points(session, org_id=viewer.org_id, device_id=device, model_name=model)
    series = views.drift_series(points)
    devices, models = queries.drift_choices(session, org_id=viewer.org_id)
    context = {
        "series": series,
        "chart": views.line_chart(series),
        "points": points[:200],
        "devices": devices,
        "models": models,
        "filters": {"device": device or "", "model": model or ""},
    }
    return _render(request, "drift.html", context, viewer=viewer)


@router.get("/relabel")
def relabel_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    state: Annotated[str | None, Query(max_length=16)] = "open",
) -> HTMLResponse:
    """The cloud's label tasks of this organization's devices (needs the cloud configured)."""
    source: RelabelSource | None = request.app.state.relabel_source
    context: dict[str, Any] = {"tasks": [], "error": None, "state": state or ""}
    if state and state not in ("open", "labeled", "skipped"):
        message = f"state {state!r} is unknown; choose from: open, labeled, skipped"
        return _render(request, "error.html", {"message": message}, viewer=viewer, status_code=422)
    if source is not None:
        mine = queries.org_device_ids(session, org_id=viewer.org_id)
        try:
            tasks = source.tasks(state=state or None)
        except RelabelError as err:
            context["error"] = str(err)
        else:
            context["tasks"] = [t for t in tasks if t.device_id in mine]
    by_model: dict[str, int] = {}
    for task in context["tasks"]:
        by_model[task.model] = by_model.get(task.model, 0) + 1
    context["by_model"] = dict(sorted(by_model.items()))
    return _render(request, "relabel.html", context, viewer=viewer)


@router.get("/audit")
def audit_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    actor: Annotated[str | None, Query(max_length=12)] = None,
    action: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    """The organization's audit log, newest first, 50 a page (``admin`` only, like the API)."""
    if not viewer.is_admin:
        held = ", ".join(sorted(viewer.scopes))
        message = f"the audit log needs scope 'admin'; API key {viewer.key_id!r} has: {held}"
        return _render(request, "error.html", {"message": message}, viewer=viewer, status_code=403)
    _, count = crud.list_audit(
        session, org_id=viewer.org_id, actor=actor or None, action=action or None, limit=1
    )
    paging = views.Page(number=page, size=AUDIT_PAGE, count=count)
    rows, _ = crud.list_audit(
        session,
        org_id=viewer.org_id,
        actor=actor or None,
        action=action or None,
        offset=paging.offset,
        limit=paging.size,
    )
    context = {
        "rows": rows,
        "page": paging,
        "filters": {"actor": actor or "", "action": action or ""},
    }
    return _render(request, "audit.html", context, viewer=viewer)

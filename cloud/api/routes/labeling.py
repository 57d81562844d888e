"""``/labeling``: label tasks and the Label Studio round trip; ``/retrain``: retrain policies,
runs and approvals; ``/label``: a minimal server-rendered labeling page.

Three routers in one module because they share one owner and one workflow (relabel, then
retrain). ``router`` and ``retrain_router`` sit behind the API token like every other route.
``page_router`` serves HTML to a browser, which cannot send a bearer header on a form post:
it accepts the token as a bearer header or as the ``edgeloop_cloud_token`` cookie
(``SameSite=Strict``, so other sites cannot post with it), and without one shows a form that
stores the token in that cookie. The page is plain HTML with a few lines of inline script (no
CDN); the image is rendered to PNG on the server (:mod:`cloud.dataloop.labelstudio`).
"""

from __future__ import annotations

import html
import logging
import secrets
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Body, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from cloud.api.deps import ModelDep, SessionDep, SettingsDep
from cloud.dataloop import labeling, retrain
from cloud.dataloop.labeling_models import (
    ApprovalRequest,
    LabelRequest,
    LabelStudioImportResult,
    LabelTaskPublic,
    LabelTasksCreate,
    LabelTasksCreated,
    LabelTasksPublic,
    LabelTaskState,
    RetrainPolicyPublic,
    RetrainPolicyPut,
    RetrainRunPublic,
    RetrainRunsPublic,
    RetrainRunState,
    SkipRequest,
)
from cloud.errors import CloudError, NotFoundError
from cloud.settings import CloudSettings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/labeling", tags=["labeling"])
retrain_router = APIRouter(prefix="/retrain", tags=["retrain"])
page_router = APIRouter(prefix="/label", tags=["labeling page"], include_in_schema=False)

COOKIE = "edgeloop_cloud_token"


def _after_labels(session: SessionDep, settings: CloudSettings, models: set[str]) -> None:
    """Let a label-count policy fire now (its failure never undoes the labels)."""
    for model in sorted(models):
        try:
            run = retrain.maybe_trigger(session, settings=settings, model_name=model)
            session.commit()
        except IntegrityError:  # a concurrent request recorded the model's run first
            session.rollback()
            continue
        except CloudError as err:
            session.rollback()
            log.warning("retrain trigger of model %s failed: %s", model, err)
            continue
        if run is not None:
            log.info("labels of model %s triggered retrain run %s", model, run.id)


# ---------------------------------------------------------------- label tasks


@router.get("/tasks")
def list_tasks(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=64)] = None,
    state: LabelTaskState | None = None,
    reason: Annotated[str | None, Query(max_length=32)] = None,
    device_id: Annotated[str | None, Query(max_length=128)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LabelTasksPublic:
    """Label tasks, oldest first, filtered by model, state, reason and device."""
    rows, count = labeling.list_tasks(
        session,
        model=model,
        state=state,
        reason=reason,
        device_id=device_id,
        offset=offset,
        limit=limit,
    )
    views = labeling.TaskViews(session)
    return LabelTasksPublic(data=[views.public(r) for r in rows], count=count)


@router.post("/tasks", status_code=status.HTTP_201_CREATED)
def create_tasks(session: SessionDep, body: LabelTasksCreate) -> LabelTasksCreated:
    """Label tasks for the samples of a drift alert or a selection of sample ids."""
    created, existing = labeling.create_tasks(
        session, sample_ids=body.sample_ids, alert_id=body.alert_id, reason=body.reason
    )
    session.commit()
    views = labeling.TaskViews(session)
    return LabelTasksCreated(created=[views.public(t) for t in created], existing=existing)


@router.get("/tasks/{task_id}")
def get_task(session: SessionDep, task_id: int) -> LabelTaskPublic:
    """One label task, with the labels allowed."""
    return labeling.TaskViews(session).public(labeling.get_task(session, task_id=task_id))


@router.post("/tasks/{task_id}/label")
def label_task(
    session: SessionDep, settings: SettingsDep, task_id: int, body: LabelRequest
) -> LabelTaskPublic:
    """Label a task with one of its model's classes (422 names the choices otherwise)."""
    task = labeling.get_task(session, task_id=task_id)
    labeling.label_task(session, task=task, label=body.label, labeled_by=body.labeled_by)
    session.commit()
    _after_labels(session, settings, {task.model})
    return labeling.TaskViews(session).public(labeling.get_task(session, task_id=task_id))


@router.post("/tasks/{task_id}/skip")
def skip_task(session: SessionDep, task_id: int, body: SkipRequest) -> LabelTaskPublic:
    """Skip a task (it is not used for training)."""
    task = labeling.get_task(session, task_id=task_id)
    labeling.skip_task(session, task=task, labeled_by=body.labeled_by)
    session.commit()
    return labeling.TaskViews(session).public(task)


@router.get("/labelstudio/export")
def export_labelstudio(
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=64)] = None,
    state: LabelTaskState = LabelTaskState.OPEN,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict[str, Any]]:
    """Tasks (open ones by default) as Label Studio tasks with the prediction pre-annotated."""
    return labeling.export_labelstudio(
        session, blob_dir=labeling.tensor_dir(settings), model=model, state=state, limit=limit
    )


@router.get("/labelstudio/config", response_class=Response)
def labelstudio_config(
    session: SessionDep, settings: SettingsDep, model: Annotated[str, Query(max_length=64)]
) -> Response:
    """The Label Studio labeling configuration (XML) for the model's tasks."""
    from cloud import crud
    from cloud.dataloop.labelstudio import labeling_config, sample_kind

    rows, _ = labeling.list_tasks(session, model=model, limit=1)
    if not rows:
        raise NotFoundError(f"model {model!r} has no label tasks")
    task = rows[0]
    version = crud.get_version_by_id(session, version_id=task.model_version_id)
    sample = labeling.find_samples(session, sample_ids=[task.sample_id]).get(task.sample_id)
    if version is None or sample is None:
        raise NotFoundError(f"the model version or sample of label task {task.id} is gone")
    kind = sample_kind(labeling.sample_input(labeling.tensor_dir(settings), sample))
    return Response(labeling_config(version.classes, kind), media_type="application/xml")


@router.post("/labelstudio/import")
def import_labelstudio(
    session: SessionDep, settings: SettingsDep, payload: Annotated[Any, Body()]
) -> LabelStudioImportResult:
    """Apply a Label Studio JSON export (all or nothing; re-importing changes nothing)."""
    result = labeling.import_labelstudio(session, payload=payload)
    session.commit()
    if result.labeled:
        _after_labels(session, settings, set(result.models))
    return result


# ---------------------------------------------------------------- retrain


@retrain_router.get("/policies/{name}")
def get_policy(session: SessionDep, model: ModelDep) -> RetrainPolicyPublic:
    """The model's retrain policy."""
    row = retrain.get_policy(session, model=model)
    if row is None:
        raise NotFoundError(
            f"model {model.name!r} has no retrain policy; set one with PUT /retrain/policies/"
            f"{model.name}"
        )
    return retrain.policy_public(model, row)


@retrain_router.put("/policies/{name}")
def put_policy(session: SessionDep, model: ModelDep, body: RetrainPolicyPut) -> RetrainPolicyPublic:
    """Create or replace the model's retrain policy."""
    row = retrain.put_policy(session, model=model, policy_in=body)
    session.commit()
    return retrain.policy_public(model, row)


@retrain_router.get("/runs")
def list_runs(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=64)] = None,
    state: RetrainRunState | None = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RetrainRunsPublic:
    """Retrain runs, newest first."""
    from cloud import crud

    row = None
    if model is not None:
        row = crud.get_model(session, name=model)
        if row is None:
            raise NotFoundError(f"no model {model!r}; list them with GET /models")
    runs, count = retrain.list_runs(session, model=row, state=state, offset=offset, limit=limit)
    return RetrainRunsPublic(data=[retrain.run_public(session, run=r) for r in runs], count=count)


@retrain_router.get("/runs/{run_id}")
def get_run(session: SessionDep, run_id: int) -> RetrainRunPublic:
    """One retrain run with every step's id."""
    return retrain.run_public(session, run=retrain.get_run(session, run_id=run_id))


@retrain_router.post("/runs/{run_id}/approval")
def decide_run(
    session: SessionDep, settings: SettingsDep, run_id: int, body: ApprovalRequest
) -> RetrainRunPublic:
    """Approve (start training) or reject a run that awaits approval."""
    run = retrain.get_run(session, run_id=run_id)
    retrain.approve_run(session, settings=settings, run=run, approve=body.approve, by=body.by)
    session.commit()
    return retrain.run_public(session, run=run)


class TickPublic(BaseModel):
    """What one evaluation of the retrain policies did."""

    triggered: list[int]
    advanced: list[int]
    errors: list[str]


@retrain_router.post("/tick")
def tick(request: Request, settings: SettingsDep) -> TickPublic:
    """Evaluate every policy and advance every active run now (the monitor loop does this
    periodically)."""
    from cloud import db

    target = retrain.fleet_target(settings)
    try:
        report = retrain.tick(
            db.session_factory(request.app.state.engine), settings=settings, target=target
        )
    finally:
        if target is not None:
            target.close()
    return TickPublic(triggered=report.triggered, advanced=report.advanced, errors=report.errors)


# ---------------------------------------------------------------- the labeling page

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:52rem;color:#222}
img{image-rendering:pixelated;border:1px solid #999;background:#fff}
.classes button{font-size:1.3rem;min-width:3.2rem;margin:.25rem;padding:.4rem .7rem}
.classes button.pred{outline:3px solid #2a7}
.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}
"""

_LOGIN_SCRIPT = """
document.getElementById('login').addEventListener('submit', function (e) {
  e.preventDefault();
  var token = document.getElementById('token').value;
  document.cookie = 'edgeloop_cloud_token=' + encodeURIComponent(token) +
    '; path=/; SameSite=Strict';
  location.reload();
});
"""

_KEYS_SCRIPT = """
document.addEventListener('keydown', function (e) {
  var b = document.querySelector('button[data-key="' + e.key + '"]');
  if (b) { b.click(); }
});
"""


def _page(title: str, body: str, *, status_code: int = 200, script: str = "") -> HTMLResponse:
    script_tag = f"<script>{script}</script>" if script else ""
    return HTMLResponse(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}{script_tag}</body></html>",
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


def _authorized(request: Request, settings: CloudSettings) -> bool:
    expected = settings.api_token.get_secret_value() if settings.api_token else ""
    given = request.cookies.get(COOKIE, "")
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    return bool(expected) and secrets.compare_digest(given.encode(), expected.encode())


def _login() -> HTMLResponse:
    body = (
        "<h1>EdgeLoop labeling</h1><p>Enter the cloud API token "
        "(EDGELOOP_CLOUD_API_TOKEN); it is kept in a same-site cookie of this browser.</p>"
        "<form id='login'><input id='token' type='password' size='40' autofocus> "
        "<button type='submit'>Continue</button></form>"
    )
    return _page("EdgeLoop labeling: sign in", body, status_code=401, script=_LOGIN_SCRIPT)


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


@page_router.get("", response_class=HTMLResponse)
def next_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The next open task's page (or a page saying there is none)."""
    if not _authorized(request, settings):
        return _login()
    task = labeling.next_open_task(session, model=model, after=after)
    if task is None:
        which = f" of model {html.escape(model)}" if model else ""
        return _page("Nothing to label", f"<h1>No open label tasks{which}</h1>")
    suffix = f"?model={quote(model)}" if model else ""
    return RedirectResponse(f"/label/{task.id}{suffix}", status_code=status.HTTP_303_SEE_OTHER)


@page_router.get("/{task_id}", response_class=HTMLResponse)
def task_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    task_id: int,
    model: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """One task: the sample (image or values), the prediction and a button per class."""
    from cloud.dataloop.labelstudio import as_image, png_data_uri

    if not _authorized(request, settings):
        return _login()
    try:
        task = labeling.get_task(session, task_id=task_id)
    except NotFoundError as err:
        return _page("Not found", f"<h1>{html.escape(str(err))}</h1>", status_code=404)
    view = labeling.TaskViews(session).public(task)
    sample = labeling.find_samples(session, sample_ids=[task.sample_id]).get(task.sample_id)
    if sample is None:
        shown = "<p>The sample is gone.</p>"
    else:
        x = labeling.sample_input(labeling.tensor_dir(settings), sample)
        image = as_image(x)
        if image is not None:
            shown = f"<img alt='sample {html.escape(task.sample_id)}' src='{png_data_uri(image)}'>"
        else:
            cells = "".join(
                f"<tr><th>f{i}</th><td>{float(v):.6g}</td></tr>" for i, v in enumerate(x.ravel())
            )
            shown = f"<table>{cells}</table>"
    suffix = f"?model={quote(model)}" if model else ""
    buttons = []
    for i, cls in enumerate(view.classes):
        key = str(i + 1) if i < 9 else ""
        css = " class='pred'" if cls == task.prediction else ""
        buttons.append(
            f"<button type='submit' name='label' value='{html.escape(cls, quote=True)}'"
            f" data-key='{key}'{css}>{html.escape(cls)}</button>"
        )
    confidence = f"{task.confidence:.3f}" if task.confidence is not None else "-"
    state = f"{task.state}" + (f": {html.escape(task.label)}" if task.label else "")
    body = (
        f"<h1>Label task {task.id}</h1>"
        f"<p class='meta'>model {html.escape(task.model)} v{view.version} · device "
        f"{html.escape(task.device_id)} · reason {html.escape(task.reason)} · "
        f"prediction <b>{html.escape(task.prediction or '-')}</b> ({confidence}) · "
        f"state {state} · created {_when(task.created_at)}</p>"
        f"<p>{shown}</p>"
        f"<form method='post' action='/label/{task.id}{suffix}'>"
        f"<div class='classes'>{''.join(buttons)}</div>"
        "<p><button type='submit' name='skip' value='1'>Skip</button> "
        f"<a href='/label?after={task.id}{'&model=' + quote(model) if model else ''}'>"
        "Next</a></p></form>"
    )
    return _page(f"Label task {task.id}", body, script=_KEYS_SCRIPT)


@page_router.post("/{task_id}", response_class=HTMLResponse)
async def submit_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    task_id: int,
    model: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The page's form: label or skip, then on to the next open task."""
    if not _authorized(request, settings):
        return _login()
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    try:
        task = labeling.get_task(session, task_id=task_id)
        if form.get("skip"):
            labeling.skip_task(session, task=task, labeled_by="label-page")
        else:
            label = (form.get("label") or [""])[0]
            labeling.label_task(session, task=task, label=label, labeled_by="label-page")
        session.commit()
    except CloudError as err:
        session.rollback()
        return _page(
            "Refused",
            f"<h1>Refused</h1><p>{html.escape(str(err))}</p>"
            f"<p><a href='/label/{task_id}'>Back</a></p>",
            status_code=err.http_status,
        )
    if not form.get("skip"):
        _after_labels(session, settings, {task.model})
    suffix = f"&model={quote(model)}" if model else ""
    return RedirectResponse(
        f"/label?after={task_id}{suffix}", status_code=status.HTTP_303_SEE_OTHER
    )

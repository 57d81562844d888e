"""Deployments (rollouts) of a model's artifact variants to the caller's devices.

Creating one resolves the target in the caller's organization, picks each device's variant
by its hardware profile and lists the devices without one (never skipped silently); a bad
policy answers 422 naming each field. The rollout then runs in :mod:`fleet.executor`.
Operator commands (pause, resume, cancel, rollback) change the stored state at once; jobs
they cancel or roll back are carried out by the executor from the deployment's outbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query, Request, status

from fleet import deployments, rollout
from fleet.api.deps import AuditDep, DeploymentDep, OrgDep, SessionDep, require_scope
from fleet.api.routing import AuditedRoute
from fleet.crud import MAX_OFFSET
from fleet.models import Deployment, DeploymentCreate, DeploymentPublic, DeploymentsPublic
from fleet.rollout import Action, Phase, RolloutState
from fleet.scopes import Scope

router = APIRouter(prefix="/deployments", tags=["deployments"], route_class=AuditedRoute)

Command = Callable[..., tuple[RolloutState, list[Action]]]


def _wake_executor(request: Request) -> None:
    """Let the executor step the deployment now rather than at its next timer."""
    executor = getattr(request.app.state, "executor", None)
    if executor is not None:
        executor.wake()


@router.post(
    "", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_scope(Scope.DEPLOY))]
)
def create_deployment(
    request: Request,
    session: SessionDep,
    org: OrgDep,
    audit: AuditDep,
    deployment_in: DeploymentCreate,
) -> DeploymentPublic:
    """Plan a rollout; the response lists each device's variant and the unmatched devices."""
    deployment = deployments.create_deployment(
        session, org_id=org.id, deployment_in=deployment_in, now=time.time()
    )
    session.commit()
    _wake_executor(request)
    audit.target = f"deployment:{deployment.id}"
    return deployments.to_public(deployment)


@router.get("", dependencies=[Depends(require_scope(Scope.READ))])
def list_deployments(
    session: SessionDep,
    org: OrgDep,
    phase: Phase | None = None,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(100, ge=1, le=1000),
) -> DeploymentsPublic:
    """The organization's deployments, newest first, optionally in one phase."""
    rows, count = deployments.list_deployments(
        session,
        org_id=org.id,
        phase=phase.value if phase is not None else None,
        offset=offset,
        limit=limit,
    )
    return DeploymentsPublic(data=[deployments.to_public(d) for d in rows], count=count)


@router.get("/{deployment_id}", dependencies=[Depends(require_scope(Scope.READ))])
def read_deployment(deployment: DeploymentDep) -> DeploymentPublic:
    """One deployment with per-device job states and counts."""
    return deployments.to_public(deployment)


def _command(
    request: Request, session: SessionDep, deployment: Deployment, command: Command
) -> DeploymentPublic:
    state, actions = command(deployments.load_state(deployment.state), now=time.time())
    outbox = [*deployment.outbox, *(deployments.dump_action(a) for a in actions)]
    deployments.save(session, deployment=deployment, state=state, outbox=outbox)
    session.commit()
    _wake_executor(request)
    session.refresh(deployment)
    return deployments.to_public(deployment)


@router.post("/{deployment_id}/pause", dependencies=[Depends(require_scope(Scope.DEPLOY))])
def pause_deployment(
    request: Request, session: SessionDep, deployment: DeploymentDep
) -> DeploymentPublic:
    """Start no more jobs; jobs already sent keep running (409 unless pending or running)."""
    return _command(request, session, deployment, rollout.pause)


@router.post("/{deployment_id}/resume", dependencies=[Depends(require_scope(Scope.DEPLOY))])
def resume_deployment(
    request: Request, session: SessionDep, deployment: DeploymentDep
) -> DeploymentPublic:
    """Continue a paused deployment (409 unless paused)."""
    return _command(request, session, deployment, rollout.resume)


@router.post("/{deployment_id}/cancel", dependencies=[Depends(require_scope(Scope.DEPLOY))])
def cancel_deployment(
    request: Request, session: SessionDep, deployment: DeploymentDep
) -> DeploymentPublic:
    """Stop: jobs in flight are marked canceled, nothing more starts, successes stay."""
    return _command(request, session, deployment, rollout.cancel)


@router.post("/{deployment_id}/rollback", dependencies=[Depends(require_scope(Scope.DEPLOY))])
def rollback_deployment(
    request: Request, session: SessionDep, deployment: DeploymentDep
) -> DeploymentPublic:
    """Reinstall the previous artifact on every device the deployment touched."""
    return _command(request, session, deployment, rollout.rollback)

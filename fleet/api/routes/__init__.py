"""One APIRouter per resource; :mod:`fleet.api.main` includes them (a deployments router
will join them). Every router uses :class:`~fleet.api.routing.AuditedRoute`."""

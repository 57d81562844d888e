"""A small typed client of the cloud API (httpx), used by the CLI and tests.

Errors come back as the cloud's own exception classes (by HTTP status), carrying the API's
``detail``; an unreachable API is a :class:`~cloud.errors.CloudError` naming the URL.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from cloud.errors import (
    AuthenticationError,
    CloudError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from cloud.models import (
    CompileJobCreate,
    CompileRecordsPublic,
    DatasetCreate,
    DatasetPublic,
    DatasetsPublic,
    HpoJobCreate,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    ModelVersionPublic,
    ModelVersionsPublic,
    RegisteredModelsPublic,
    Stage,
    TrainJobCreate,
)

M = TypeVar("M", bound=BaseModel)

_BY_STATUS: dict[int, type[CloudError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
}


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's request validation
        parts = []
        for error in detail[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            parts.append(f"{where}: {error.get('msg', '')}")
        return "; ".join(parts)
    return str(detail)


class CloudClient:
    """The cloud API at ``base_url`` with bearer ``token``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8090``.
        token: the API token.
        transport: an httpx transport (tests may pass one).
        timeout: seconds per request.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=timeout,
        )

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of ``method path``.

        Raises:
            CloudError: a subclass by status, with the API's reason.
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise CloudError(f"cannot reach the cloud API at {self.base_url}: {err}") from err
        if response.status_code >= 400:
            cls = _BY_STATUS.get(response.status_code, CloudError)
            raise cls(f"{method} {path}: HTTP {response.status_code}: {_detail(response)}")
        return response.json()

    def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self.request(method, path, **kwargs))

    # datasets
    def register_dataset(self, body: DatasetCreate) -> DatasetPublic:
        """Register a dataset version (or get the same-content newest one)."""
        return self._call(DatasetPublic, "POST", "/datasets", json=body.model_dump(mode="json"))

    def list_datasets(self, *, name: str | None = None) -> DatasetsPublic:
        """Dataset versions."""
        params = {"name": name} if name else {}
        return self._call(DatasetsPublic, "GET", "/datasets", params=params)

    # jobs
    def submit_train(self, body: TrainJobCreate) -> JobPublic:
        """Queue a train job."""
        return self._call(JobPublic, "POST", "/jobs/train", json=body.model_dump(mode="json"))

    def submit_hpo(self, body: HpoJobCreate) -> JobPublic:
        """Queue an HPO job."""
        return self._call(JobPublic, "POST", "/jobs/hpo", json=body.model_dump(mode="json"))

    def submit_compile(self, body: CompileJobCreate) -> JobPublic:
        """Queue a compile job."""
        return self._call(JobPublic, "POST", "/jobs/compile", json=body.model_dump(mode="json"))

    def list_jobs(self, **filters: Any) -> JobsPublic:
        """Jobs, newest first (filters: state, kind, parent_id, offset, limit)."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return self._call(JobsPublic, "GET", "/jobs", params=params)

    def get_job(self, job_id: int) -> JobPublic:
        """One job."""
        return self._call(JobPublic, "GET", f"/jobs/{job_id}")

    def events(self, job_id: int, *, after: int = 0) -> JobEventsPublic:
        """A job's events after ``after``."""
        return self._call(JobEventsPublic, "GET", f"/jobs/{job_id}/events", params={"after": after})

    def cancel(self, job_id: int) -> JobPublic:
        """Cancel a job."""
        return self._call(JobPublic, "POST", f"/jobs/{job_id}/cancel")

    # registry
    def list_models(self) -> RegisteredModelsPublic:
        """Registered models."""
        return self._call(RegisteredModelsPublic, "GET", "/models")

    def list_versions(self, name: str) -> ModelVersionsPublic:
        """A model's versions."""
        return self._call(ModelVersionsPublic, "GET", f"/models/{name}/versions")

    def get_version(self, name: str, version: int) -> ModelVersionPublic:
        """One model version."""
        return self._call(ModelVersionPublic, "GET", f"/models/{name}/versions/{version}")

    def promote(self, name: str, version: int, stage: Stage) -> ModelVersionPublic:
        """Move a version to ``stage``."""
        return self._call(
            ModelVersionPublic,
            "POST",
            f"/models/{name}/versions/{version}/promote",
            json={"stage": stage.value},
        )

    def compiles(self, name: str, version: int) -> CompileRecordsPublic:
        """A version's compile records."""
        return self._call(
            CompileRecordsPublic, "GET", f"/models/{name}/versions/{version}/compiles"
        )

    def lineage(self, artifact_id: str) -> Any:
        """The lineage of an artifact (a :class:`cloud.lineage.Lineage`)."""
        from cloud.lineage import Lineage

        return self._call(Lineage, "GET", f"/lineage/{artifact_id}")

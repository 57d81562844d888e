"""The relabel queue, read from the cloud service's API (an adapter, injected into the app).

The cloud service owns label tasks (``GET /labeling/tasks``, cloud/api/routes/labeling.py)
and has no organizations: one cloud serves one fleet deployment. The dashboard therefore
shows only tasks whose ``device_id`` is a device of the signed-in key's organization, so a
shared cloud never leaks another tenant's samples through the fleet dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx

PAGE = 1000
MAX_PAGES = 20


class RelabelError(Exception):
    """The cloud service could not be asked (unreachable, refused, or answered nonsense)."""


@dataclass(frozen=True)
class LabelTask:
    """One label task as the relabel page lists it."""

    id: int
    device_id: str
    model: str
    version: int | None
    reason: str
    prediction: str | None
    confidence: float | None
    state: str
    label: str | None
    created_at: datetime


class RelabelSource(Protocol):
    """Where the dashboard reads label tasks from."""

    def tasks(self, *, state: str | None) -> list[LabelTask]: ...


class CloudRelabelSource:
    """Label tasks from the cloud API at ``url`` with its bearer ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client_args: dict[str, Any] = {
            "base_url": self.url,
            "headers": headers,
            "timeout": timeout_s,
            "transport": transport,
        }

    def tasks(self, *, state: str | None) -> list[LabelTask]:
        """Every task in ``state`` (all states if None), oldest first.

        Raises:
            RelabelError: naming the URL and what went wrong.
        """
        out: list[LabelTask] = []
        try:
            with httpx.Client(**self._client_args) as client:
                for page in range(MAX_PAGES):
                    params: dict[str, Any] = {"offset": page * PAGE, "limit": PAGE}
                    if state:
                        params["state"] = state
                    response = client.get("/labeling/tasks", params=params)
                    if response.status_code != 200:
                        raise RelabelError(
                            f"cloud service {self.url} answered {response.status_code} to "
                            f"GET /labeling/tasks: {response.text[:200]}"
                        )
                    body = response.json()
                    out += [_task(t) for t in body["data"]]
                    if len(out) >= int(body["count"]) or not body["data"]:
                        break
        except httpx.HTTPError as err:
            raise RelabelError(f"cloud service {self.url} is unreachable: {err}") from err
        except (KeyError, TypeError, ValueError) as err:
            raise RelabelError(
                f"cloud service {self.url} answered an unexpected body: {err}"
            ) from err
        return out


def _task(data: dict[str, Any]) -> LabelTask:
    return LabelTask(
        id=int(data["id"]),
        device_id=str(data["device_id"]),
        model=str(data["model"]),
        version=data.get("version"),
        reason=str(data["reason"]),
        prediction=data.get("prediction"),
        confidence=data.get("confidence"),
        state=str(data["state"]),
        label=data.get("label"),
        created_at=datetime.fromisoformat(str(data["created_at"])),
    )

"""Settings of the cloud service (``EDGELOOP_CLOUD_*``), created by the caller, never at import.

* ``EDGELOOP_CLOUD_STATE_DIR``: the service's state (default ``<user data>/cloud``)
* ``EDGELOOP_CLOUD_DATABASE_URL``: SQLAlchemy URL (default ``sqlite:///<state dir>/cloud.db``;
  ``postgresql://user@host/db`` uses psycopg 3). The fleet may share the database: the cloud's
  tables are ``cloud_*`` and its Alembic version table is ``cloud_alembic_version``.
* ``EDGELOOP_CLOUD_MIGRATE_ON_START``: run the Alembic upgrade when the API starts (default true)
* ``EDGELOOP_CLOUD_API_TOKEN``: the bearer token of the API (no default; the API refuses to
  start without one) and, for the CLI, the token it sends
* ``EDGELOOP_CLOUD_API_URL``: where the CLI finds the API (default ``http://127.0.0.1:8090``)
* ``EDGELOOP_CLOUD_BLOB_DIR``: datasets' stored copies and jobs' outputs (default
  ``<state dir>/blobs``); workers and the API must see the same directory
* ``EDGELOOP_CLOUD_LEASE_S``: a running job's lease; its worker renews it every third of it
  (default 30)
* ``EDGELOOP_CLOUD_MAX_ATTEMPTS``: how often a job whose worker was lost is tried (default 2)
* ``EDGELOOP_CLOUD_FLEET_URL`` / ``_FLEET_API_KEY``: the fleet API compile jobs upload to;
  without them, ``_FLEET_STORE`` (a local fleet artifact store directory) is used
* ``EDGELOOP_CLOUD_SIGNING_KEY``: the private key compile jobs sign with (default: the
  compiler's default key)
* ``EDGELOOP_CLOUD_TUNING_DB``: the MetaSchedule database of compile jobs (default: the
  compiler's)
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_URL = "http://127.0.0.1:8090"


class CloudSettings(BaseSettings):
    """The cloud service's settings (``EDGELOOP_CLOUD_*``; command-line options win)."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_CLOUD_", extra="ignore")

    state_dir: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("edgeloop") / "cloud"
    )
    database_url: str | None = None
    migrate_on_start: bool = True
    api_token: SecretStr | None = None
    api_url: str = DEFAULT_API_URL
    blob_dir: Path | None = None
    lease_s: float = Field(default=30.0, gt=0.5, le=3600)
    max_attempts: int = Field(default=2, ge=1, le=100)
    fleet_url: str | None = None
    fleet_api_key: SecretStr | None = None
    fleet_store: Path | None = None
    signing_key: Path | None = None
    tuning_db: Path | None = None

    def resolved_database_url(self) -> str:
        """``database_url``, or the SQLite file in ``state_dir``."""
        return self.database_url or f"sqlite:///{self.state_dir / 'cloud.db'}"

    def resolved_blob_dir(self) -> Path:
        """``blob_dir``, or ``<state dir>/blobs``."""
        return self.blob_dir or self.state_dir / "blobs"

    @property
    def heartbeat_s(self) -> float:
        """How often a worker renews its lease: a third of it."""
        return self.lease_s / 3

"""Settings of the fleet API: :class:`~fleet.cli.FleetSettings` plus the database and broker.

Same prefix (``EDGELOOP_FLEET_``), created by the caller (CLI command, test), never at import:

* ``EDGELOOP_FLEET_STATE_DIR``: the API's state (default ``<user data>/fleet``)
* ``EDGELOOP_FLEET_DATABASE_URL``: SQLAlchemy URL (default ``sqlite:///<state dir>/fleet.db``;
  ``postgresql://user@host/db`` uses psycopg 3)
* ``EDGELOOP_FLEET_MIGRATE_ON_START``: run the Alembic upgrade when the app starts (default true)
* ``EDGELOOP_FLEET_MAX_UPLOAD_BYTES``: largest artifact upload (default 2 GiB)
* ``EDGELOOP_FLEET_BROKER_PASSWORD_FILE`` / ``_BROKER_PID_FILE``: Mosquitto's password file
  that device registration edits, and the pid file of the broker to SIGHUP afterwards
* ``EDGELOOP_FLEET_CLOUD_URL`` / ``_CLOUD_TOKEN``: the cloud service the dashboard reads the
  relabel queue from (docs/dashboard.md; unset: the page says it is not configured)
* ``EDGELOOP_FLEET_DASHBOARD_SECRET``: HMAC key of dashboard session cookies (default: a
  random one per process, so sessions end when the service restarts); ``_DASHBOARD_SESSION_S``
  their lifetime (default 8 h)
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr, model_validator

from fleet.cli import FleetSettings


class ApiSettings(FleetSettings):
    """The fleet API's settings (``EDGELOOP_FLEET_*``)."""

    state_dir: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("edgeloop") / "fleet"
    )
    database_url: str | None = None
    migrate_on_start: bool = True
    max_upload_bytes: int = Field(default=2 << 30, ge=1)
    broker_password_file: Path | None = None
    broker_pid_file: Path | None = None
    cloud_url: str | None = None
    cloud_token: SecretStr | None = None
    dashboard_secret: SecretStr | None = None
    dashboard_session_s: int = Field(default=8 * 3600, ge=60, le=30 * 86400)

    @model_validator(mode="after")
    def _broker_pair(self) -> ApiSettings:
        if (self.broker_password_file is None) != (self.broker_pid_file is None):
            raise ValueError(
                "set both EDGELOOP_FLEET_BROKER_PASSWORD_FILE and EDGELOOP_FLEET_BROKER_PID_FILE "
                f"or neither (got password file {self.broker_password_file}, "
                f"pid file {self.broker_pid_file})"
            )
        return self

    def resolved_database_url(self) -> str:
        """``database_url``, or the SQLite file in ``state_dir``."""
        return self.database_url or f"sqlite:///{self.state_dir / 'fleet.db'}"

"""Settings of the data loop's cloud processes (``EDGELOOP_DATALOOP_*``), created by the caller.

* ``BROKER_HOST`` / ``BROKER_PORT`` / ``BROKER_USERNAME`` / ``BROKER_PASSWORD`` /
  ``BROKER_TLS_CA``: the MQTT broker; the user must read ``capture/#`` of every device and
  write every device's ``desired`` topic (the broker's ``fleet`` user does, see
  :func:`fleet.broker.render_acl`)
* ``GROUP``: the shared-subscription group of the ingest consumers (default
  ``edgeloop-ingest``); consumers of one group split the messages between them
* ``CLIENT_ID``: a fixed MQTT client id makes the session persistent, so messages that
  arrive while the consumer restarts are kept by the broker (``SESSION_EXPIRY_S``)
* ``BATCH_SIZE`` / ``BATCH_WAIT_S`` / ``QUEUE_SIZE``: messages per database transaction, how
  long a partial batch waits, and how many received messages may wait in memory
* ``FLEET_URL`` / ``FLEET_API_KEY``: the fleet API drift scores are posted to (optional)
* ``WEBHOOK_TIMEOUT_S``: timeout of an alert's webhook POST
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GROUP = "edgeloop-ingest"


class DataloopSettings(BaseSettings):
    """The data loop's broker, consumer and fleet settings (``EDGELOOP_DATALOOP_*``)."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_DATALOOP_", extra="ignore")

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, ge=1, le=65535)
    broker_username: str = "fleet"
    broker_password: SecretStr | None = None
    broker_tls_ca: Path | None = None
    group: str = Field(default=DEFAULT_GROUP, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    client_id: str | None = None
    session_expiry_s: int = Field(default=3600, ge=0)
    batch_size: int = Field(default=200, ge=1, le=10_000)
    batch_wait_s: float = Field(default=0.5, gt=0, le=60)
    queue_size: int = Field(default=10_000, ge=1)
    fleet_url: str | None = None
    fleet_api_key: SecretStr | None = None
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=120)

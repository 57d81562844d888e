"""Agent settings: a TOML file (``--config agent.toml``) with ``EDGELOOP_AGENT_*`` overrides.

Environment variables win over the file; nested fields use ``__``, e.g.
``EDGELOOP_AGENT_BROKER__HOST=broker.local``. Created by the CLI, never at import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.protocol import DEFAULT_CHUNK_SIZE, check_device_id

_HOOK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

MqttProtocol = Literal["5", "3.1.1"]
"""The MQTT version a client speaks: "5" (the default and the production path) or "3.1.1"
(for brokers without MQTT 5, such as the demo's embedded amqtt broker; docs/protocol.md)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=2, le=3600)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    protocol: MqttProtocol = Field(
        default="5",
        description='MQTT version: "5", or "3.1.1" for a broker without MQTT 5 (a persistent '
        "session by clean_session=false, kept as long as the broker keeps it; no "
        "session_expiry_s, no properties)",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> object:
        # TOML or an environment variable may give the version as a number (5, 3.1.1 is not).
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TransferSettings(_Section):
    """Chunked download tuning."""

    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=4096, le=1024 * 1024)
    window: int = Field(default=16, ge=1, le=256)
    chunk_timeout_s: float = Field(default=10.0, gt=0)
    max_artifact_mib: int = Field(default=2048, gt=0)
    max_retries: int = Field(
        default=200, ge=1, description="chunk re-requests (timeouts) before the job fails"
    )
    max_bad_frames: int = Field(
        default=64, ge=1, description="rejected chunks (wrong length, bad hash) before failing"
    )
    max_file_attempts: int = Field(
        default=2, ge=1, description="whole-file downloads whose sha256 mismatched before failing"
    )


class HttpSettings(_Section):
    """The local Open Inference Protocol server."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_concurrency: int = Field(default=4, ge=1)


class RuntimeSettings(_Section):
    """Knobs of the model runtimes (agent.runtimes.RuntimeOptions)."""

    num_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads (default: every CPU this process may use)"
    )
    ethos_u_delegate: Path | None = Field(
        default=None,
        description="the Ethos-U external delegate library (default: the i.MX93 BSP's paths)",
    )


class CaptureSettings(_Section):
    """The data loop's local limits; the capture policy itself comes from desired state."""

    spool_path: Path | None = Field(
        default=None, description="SQLite spool (default: state_dir/capture/spool.db)"
    )
    max_spool_bytes: int = Field(
        default=64 * 1024 * 1024, ge=64 * 1024, description="unless the policy sets its own"
    )
    queue_size: int = Field(
        default=256, ge=1, description="answered inferences waiting for the capture thread"
    )
    redaction_hook: str | None = Field(
        default=None,
        description="'module:function' that gets each selected sample and returns it, "
        "a modified copy, or None to drop it",
    )
    drain_timeout_s: float = Field(default=10.0, gt=0, description="wait for a PUBACK")
    drain_pause_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="pause between published batches, so a device back online does not "
        "saturate its uplink",
    )

    @field_validator("redaction_hook")
    @classmethod
    def _hook(cls, value: str | None) -> str | None:
        if value is not None and not _HOOK_RE.match(value):
            raise ValueError(
                f"redaction hook {value!r} is not of the form 'module:function' "
                "(e.g. 'mycompany.privacy:blur_faces')"
            )
        return value


class AgentSettings(BaseSettings):
    """Everything the agent daemon needs."""

    model_config = SettingsConfigDict(
        env_prefix="EDGELOOP_AGENT_", env_nested_delimiter="__", extra="forbid"
    )

    device_id: str
    profile: str = Field(
        description="hardware profile of this device, e.g. raspberry-pi/4b-aarch64"
    )
    state_dir: Path = Path("/var/lib/edgeloop-agent")
    trusted_key: Path = Field(description="the fleet's ed25519 public key (PEM)")
    broker: BrokerSettings = BrokerSettings()
    transfer: TransferSettings = TransferSettings()
    http: HttpSettings = HttpSettings()
    capture: CaptureSettings = CaptureSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    keep_versions: int = Field(default=3, ge=2, description="versions kept per model on disk")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return check_device_id(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, environment, then the TOML file."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config: Path | None, **overrides: Any) -> AgentSettings:
    """Read the TOML file (if any) under environment overrides.

    Raises:
        FileNotFoundError: ``config`` does not exist.
        pydantic.ValidationError: a setting is missing or invalid (the message names it).
    """
    if config is None:
        return AgentSettings(**overrides)
    if not config.is_file():
        raise FileNotFoundError(f"agent config {str(config)!r} does not exist")

    class FromFile(AgentSettings):
        model_config = SettingsConfigDict(**{**AgentSettings.model_config, "toml_file": config})

    return FromFile(**overrides)

"""Compiler settings (``EDGELOOP_*`` environment variables), created by the CLI, never at import."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGE_PROFILES = Path(__file__).with_name("_hw_profiles")
_CHECKOUT_PROFILES = Path(__file__).resolve().parent.parent / "hw-profiles"


class CompilerSettings(BaseSettings):
    """Where keys, caches and extra profiles live.

    * ``EDGELOOP_CONFIG_DIR``: default ``~/.config/edgeloop`` (keys in ``keys/``)
    * ``EDGELOOP_CACHE_DIR``: default ``~/.cache/edgeloop`` (tuning DB, qemu sysroots)
    * ``EDGELOOP_PROFILES_DIR``: an extra directory of profiles, overriding shipped ones
    * ``EDGELOOP_TUNING_DB``: default ``<cache>/tuning``
    * ``EDGELOOP_RUNTIME_MARGIN``: how much faster than ONNX Runtime TVM must be for
      ``--runtime auto`` to ship it (default 0.05, i.e. 5 %; ties ship ONNX Runtime)
    """

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore")

    config_dir: Path = Field(default_factory=lambda: platformdirs.user_config_path("edgeloop"))
    cache_dir: Path = Field(default_factory=lambda: platformdirs.user_cache_path("edgeloop"))
    profiles_dir: Path | None = None
    tuning_db: Path | None = None
    runtime_margin: float = Field(default=0.05, ge=0, lt=1)

    @property
    def keys_dir(self) -> Path:
        """Directory of the default signing key pair."""
        return self.config_dir / "keys"

    @property
    def tuning_db_dir(self) -> Path:
        """The persistent MetaSchedule database shared by all compiles."""
        return self.tuning_db or self.cache_dir / "tuning"

    def profile_roots(self) -> list[Path]:
        """Shipped profiles first, then the user's directory (which overrides them)."""
        shipped = _CHECKOUT_PROFILES if _CHECKOUT_PROFILES.is_dir() else _PACKAGE_PROFILES
        roots = [shipped]
        if self.profiles_dir is not None:
            roots.append(self.profiles_dir)
        return roots

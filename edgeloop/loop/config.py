"""The loop's plan and its outcome: plain data, no I/O.

``LoopConfig`` fixes what the demo does (devices, models, traffic, drift policy, the margin
the retrained model must gain); ``Outcome`` is what a run observed, and ``Outcome.checks``
turns it into named pass/fail checks — the same ones the CI test asserts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HOST_PROFILE = "generic/x86_64"
ARM_PROFILE = "raspberry-pi/4b-aarch64"

# Small on purpose: good on clean digits, poor on inverted ones, quick to train on one core.
SMALL_MLP: dict[str, Any] = {
    "architecture": "mlp",
    "hparams": {"hidden": 32, "layers": 1},
    "epochs": 4,
    "batch_size": 32,
    "learning_rate": 0.003,
    "seed": 0,
}
RETRAIN_MLP: dict[str, Any] = {**SMALL_MLP, "hparams": {"hidden": 64, "layers": 1}, "epochs": 15}


@dataclass(frozen=True)
class LoopConfig:
    """What one run of the loop does.

    The index ranges pick from the 1,797 ``builtin:digits`` images: clean warm-up traffic,
    the traffic (inverted on the shifted device) whose captured samples get labeled, and a
    held-out set that is only ever used to measure accuracy.
    """

    model: str = "digits"
    group: str = "lab"
    host_profile: str = HOST_PROFILE
    arm_profile: str | None = ARM_PROFILE
    devices: tuple[str, ...] = ("cam-1", "cam-2", "cam-3")
    shifted: str = "cam-2"
    # Devices that run as emulated aarch64 devices (the agent under qemu-aarch64, profile
    # ``arm_profile``); the others run the host profile natively.
    emulated: tuple[str, ...] = ()
    training: dict[str, Any] = field(default_factory=lambda: dict(SMALL_MLP))
    retraining: dict[str, Any] = field(default_factory=lambda: dict(RETRAIN_MLP))
    warmup: tuple[int, int] = (0, 150)
    traffic: tuple[int, int] = (150, 550)
    held_out: tuple[int, int] = (1200, 1500)
    # KS (max over the 64 pixels): a window of n clean digits stays near 1.36 / sqrt(n) per
    # pixel (0.19 at n = 50); inverted digits move most pixels' mass to the other end (KS
    # near 1). PSI's maximum over 64 pixels of such small windows is too noisy.
    drift_metric: str = "ks"
    drift_threshold: float = 0.5
    min_samples: int = 50
    sketch_interval_s: float = 2.0
    margin: float = 0.10  # accuracy on the shifted data must improve by at least this
    min_clean_accuracy: float = 0.8

    @property
    def profiles(self) -> tuple[str, ...]:
        """Profiles every model version is compiled for."""
        return (self.host_profile,) + ((self.arm_profile,) if self.arm_profile else ())

    @property
    def clean_devices(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices if d != self.shifted)

    def profile_of(self, device_id: str) -> str:
        """The hardware profile ``device_id`` registers with (and gets artifacts for)."""
        if device_id in self.emulated and self.arm_profile:
            return self.arm_profile
        return self.host_profile

    @property
    def device_profiles(self) -> dict[str, str]:
        return {d: self.profile_of(d) for d in self.devices}


#: The device that becomes the emulated aarch64 device when emulation is possible.
EMULATED_DEVICE = "cam-3"


def make_config(*, short: bool, arm: bool, emulate: bool = False) -> LoopConfig:
    """The demo's plan: ``short`` for CI (host profile only), ``arm`` adds the ARM profile.

    Short mode keeps the traffic the drift and accuracy checks need and drops the ARM
    compile (its verification under qemu costs about a minute per model version).
    ``emulate`` (only with the ARM profile) makes ``EMULATED_DEVICE`` an emulated aarch64
    device: its agent runs under qemu-aarch64 and is served the ARM artifact.
    """
    arm_profile = ARM_PROFILE if arm and not short else None
    emulated = (EMULATED_DEVICE,) if emulate and arm_profile else ()
    return LoopConfig(arm_profile=arm_profile, emulated=emulated)


def config_json(config: LoopConfig) -> dict[str, Any]:
    """``config`` as JSON data (``Outcome.config``), its derived profiles included."""
    data = asdict(config)
    data["profiles"] = list(config.profiles)
    data["device_profiles"] = config.device_profiles
    return data


@dataclass
class Outcome:
    """What a run observed; ``checks`` judges it."""

    config: dict[str, Any]
    started_at: str = ""  # UTC, ISO 8601: time zero of ``timeline`` and ``stages``
    compiled: dict[str, dict[str, str]] = field(default_factory=dict)  # v1, per profile
    v1: str = ""  # the host profile's artifact of each version
    v2: str = ""
    # Every profile's artifact of each version (profile -> artifact id); when empty, every
    # device is expected to serve ``v1`` / ``v2``.
    v1_variants: dict[str, str] = field(default_factory=dict)
    v2_variants: dict[str, str] = field(default_factory=dict)
    accuracy_clean: float = float("nan")
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    alert_devices: list[str] = field(default_factory=list)
    max_drift: dict[str, float] = field(default_factory=dict)
    fleet_max_drift: dict[str, float] = field(default_factory=dict)
    labeled: int = 0
    retrain_state: str = ""
    retrain_version: int = 0
    canary_stages: list[int] = field(default_factory=list)
    serving_after: dict[str, list[str]] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    drift_scores: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    # What the services answered along the way, for the test's finer assertions.
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def checks(self) -> dict[str, bool]:
        """The run's own verdict, by name (all true: the loop did its job)."""
        cfg = self.config
        shifted = cfg["shifted"]
        threshold = cfg["drift_threshold"]
        clean = [d for d in cfg["devices"] if d != shifted]
        return {
            "drift alert for the shifted device only": self.alert_devices == [shifted],
            "clean devices scored below the threshold": bool(clean)
            and all(d in self.max_drift and self.max_drift[d] < threshold for d in clean),
            "shifted device scored at or above the threshold": self.max_drift.get(shifted, 0.0)
            >= threshold,
            "drift scores reached the fleet": self.fleet_max_drift.get(shifted, 0.0) >= threshold
            and all(self.fleet_max_drift.get(d, 1.0) < threshold for d in clean),
            "retrained model deployed through a canary": self.retrain_state == "deployed"
            and self.retrain_version == 2
            and len(self.canary_stages) == 2
            and self.canary_stages[0] == 1
            and sum(self.canary_stages) == len(cfg["devices"]),
            "every device serves the retrained model": bool(self.v2)
            and self.v2 != self.v1
            and not set(self.v2_variants.values()) & set(self.v1_variants.values())
            and all(v == [self.expected_v2(d)] for d, v in self.serving_after.items())
            and sorted(self.serving_after) == sorted(cfg["devices"]),
            "accuracy on shifted data up by the margin": self.accuracy_after
            >= self.accuracy_before + cfg["margin"],
        }

    def expected_v2(self, device_id: str) -> str:
        """The retrained artifact ``device_id`` must serve: its profile's variant."""
        profile = self.config.get("device_profiles", {}).get(device_id)
        return self.v2_variants.get(profile, self.v2) if profile else self.v2

    @property
    def ok(self) -> bool:
        return all(self.checks().values())

    def to_json(self) -> dict[str, Any]:
        """The machine-readable summary (``summary.json``)."""
        data = asdict(self)
        data["checks"] = self.checks()
        data["ok"] = self.ok
        return data

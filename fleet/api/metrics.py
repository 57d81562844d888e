"""Prometheus metrics of the fleet API, on a registry per app (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    """Requests by route template, method and status, their latency, and fleet gauges
    (deployments by phase, devices online, drift per model and metric) refreshed from the
    database at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgeloop_fleet_api_requests",
            "API requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgeloop_fleet_api_request_seconds",
            "API request latency by route template and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.deployments = Gauge(
            "edgeloop_fleet_deployments",
            "Deployments by phase (all organizations).",
            ["phase"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "edgeloop_fleet_job_seconds",
            "Device job latency from the job's start to its terminal state, by outcome.",
            ["outcome"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.devices_online = Gauge(
            "edgeloop_fleet_devices_online",
            "Devices whose last heartbeat or status said online (all organizations).",
            registry=self.registry,
        )

        self.drift = Gauge(
            "edgeloop_fleet_drift_score_max",
            "Highest of the devices' latest drift scores, by model and metric (all organizations).",
            ["model", "metric"],
            registry=self.registry,
        )

    def set_drift(self, highest: dict[tuple[str, str], float]) -> None:
        """Set the drift gauge from :func:`fleet.drift.highest_latest`."""
        for (model, metric), score in highest.items():
            self.drift.labels(model, metric).set(score)

    def observe_job(self, *, outcome: str, seconds: float) -> None:
        """A device job reached ``outcome`` (a terminal JobState) ``seconds`` after it started."""
        self.job_seconds.labels(outcome).observe(seconds)

    def set_fleet(self, *, phases: dict[str, int], online: int) -> None:
        """Set the fleet gauges (every phase present, zero when none)."""
        for phase, count in phases.items():
            self.deployments.labels(phase).set(count)
        self.devices_online.set(online)

    def observe(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

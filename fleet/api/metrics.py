"""Prometheus metrics of the fleet API, on a registry per app (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ApiMetrics:
    """Requests by route template, method and status, and their latency."""

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

    def observe(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

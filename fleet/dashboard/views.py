"""What the dashboard pages show, computed from plain values (pure: no web framework, no DB).

The adapters (:mod:`fleet.dashboard.queries`) turn rows into the inputs below; the routes
hand the results to the templates and to the live JSON views. Everything here is
deterministic given its arguments (``now`` is passed in), so it is tested with tables.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

DEVICE_STATUSES = ("online", "offline", "never-seen", "revoked")
TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "ROLLED_BACK"})
BAD_JOB_STATES = frozenset({"FAILED", "CANCELED", "ROLLED_BACK"})
JOB_STATES = ("NOT_STARTED", "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "CANCELED",
              "ROLLED_BACK")  # fmt: skip
# Colour-blind-safe palette (Okabe-Ito) for chart series.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


class FilterError(ValueError):
    """A dashboard filter value is not one of the allowed ones."""


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceRow:
    """One device as the devices page lists it."""

    device_id: str
    profile: str
    group: str | None
    revoked: bool
    online: bool
    last_seen: datetime | None
    models: tuple[str, ...] = ()  # "name version" of each primary model it reported
    in_sync: bool = True

    @property
    def status(self) -> str:
        """online, offline, never-seen or revoked."""
        if self.revoked:
            return "revoked"
        if self.last_seen is None:
            return "never-seen"
        return "online" if self.online else "offline"


def reported_versions(reported_models: Iterable[Mapping[str, object]]) -> tuple[str, ...]:
    """``"name version"`` of each primary model a heartbeat listed, sorted."""
    out = []
    for model in reported_models:
        if model.get("role", "primary") == "primary":
            out.append(f"{model.get('name', '?')} {model.get('version', '?')}")
    return tuple(sorted(out))


def filter_devices(
    rows: Sequence[DeviceRow], *, status: str | None, profile: str | None, query: str | None
) -> list[DeviceRow]:
    """The rows with that status and profile whose id contains ``query`` (case-insensitive).

    Raises:
        FilterError: ``status`` is not one of :data:`DEVICE_STATUSES`.
    """
    if status and status not in DEVICE_STATUSES:
        choices = ", ".join(DEVICE_STATUSES)
        raise FilterError(f"status {status!r} is unknown; choose from: {choices}")
    needle = (query or "").strip().lower()
    return [
        r
        for r in rows
        if (not status or r.status == status)
        and (not profile or r.profile == profile)
        and (not needle or needle in r.device_id.lower())
    ]


def device_counts(rows: Iterable[DeviceRow]) -> dict[str, int]:
    """Devices per status (every status present) and ``total``."""
    counts = dict.fromkeys(DEVICE_STATUSES, 0)
    total = 0
    for row in rows:
        counts[row.status] += 1
        total += 1
    return {**counts, "total": total}


def device_json(row: DeviceRow, *, now: datetime) -> dict[str, object]:
    """One row of the devices page as its live JSON view sends it (``age`` already worded)."""
    return {
        "device_id": row.device_id,
        "status": row.status,
        "profile": row.profile,
        "group": row.group,
        "models": list(row.models),
        "in_sync": row.in_sync,
        "last_seen": row.last_seen.isoformat() if row.last_seen is not None else None,
        "last_seen_age": age(row.last_seen, now=now),
    }


def age(when: datetime | None, *, now: datetime) -> str:
    """How long ago ``when`` was, in words (``never`` for None)."""
    if when is None:
        return "never"
    seconds = max(0.0, (now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


# ---------------------------------------------------------------- deployments


@dataclass(frozen=True)
class WaveView:
    """One wave (stage) of a rollout: its devices' job states and where it stands."""

    index: int
    label: str
    devices: tuple[str, ...]
    counts: dict[str, int]
    status: str  # waiting, active, done, failed

    @property
    def total(self) -> int:
        return len(self.devices)

    @property
    def succeeded(self) -> int:
        return self.counts.get("SUCCEEDED", 0)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in TERMINAL_JOB_STATES)

    @property
    def percent(self) -> int:
        """Share of the wave's devices whose job is over (any terminal state)."""
        return 0 if not self.devices else round(100 * self.finished / self.total)

    def as_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "label": self.label,
            "devices": list(self.devices),
            "counts": self.counts,
            "status": self.status,
            "total": self.total,
            "succeeded": self.succeeded,
            "finished": self.finished,
            "percent": self.percent,
        }


def waves(
    stages: Sequence[Sequence[str]],
    states: Mapping[str, str],
    *,
    current: int,
    canary: bool,
) -> list[WaveView]:
    """Per-wave progress of a rollout.

    Args:
        stages: device ids per stage, in order (the planner's waves).
        states: deploy job state per device (``NOT_STARTED`` when untouched).
        current: the stage the rollout is in.
        canary: whether stage 0 is a canary.
    """
    out = []
    for index, devices in enumerate(stages):
        counts = dict.fromkeys(JOB_STATES, 0)
        for device in devices:
            state = states.get(device, "NOT_STARTED")
            counts[state] = counts.get(state, 0) + 1
        finished = sum(counts[s] for s in TERMINAL_JOB_STATES)
        if any(counts[s] for s in BAD_JOB_STATES):
            status = "failed"
        elif devices and finished == len(devices):
            status = "done"
        elif index == current or finished or counts["QUEUED"] or counts["IN_PROGRESS"]:
            status = "active"
        else:
            status = "waiting"
        label = "canary" if canary and index == 0 else f"wave {index if canary else index + 1}"
        out.append(
            WaveView(index=index, label=label, devices=tuple(devices), counts=counts, status=status)
        )
    return out


def overall_percent(wave_views: Sequence[WaveView]) -> int:
    """Share of all the rollout's devices whose job is over."""
    total = sum(w.total for w in wave_views)
    return 0 if total == 0 else round(100 * sum(w.finished for w in wave_views) / total)


# ---------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftPoint:
    """One posted drift score."""

    device_id: str
    model_name: str
    model_version: str
    metric: str
    score: float
    samples: int
    window_end: datetime


@dataclass
class DriftSeries:
    """The scores of one device, model version and metric over time (oldest first)."""

    device_id: str
    model_name: str
    model_version: str
    metric: str
    points: list[DriftPoint] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.device_id} · {self.model_name} v{self.model_version} · {self.metric}"

    @property
    def latest(self) -> DriftPoint:
        return self.points[-1]


def drift_point_json(point: DriftPoint) -> dict[str, object]:
    """One drift score as the overview's live JSON view sends it."""
    return {
        "device_id": point.device_id,
        "model_name": point.model_name,
        "model_version": point.model_version,
        "metric": point.metric,
        "score": point.score,
        "samples": point.samples,
        "window_end": point.window_end.isoformat(),
    }


def highest_latest(points: Iterable[DriftPoint], *, limit: int) -> list[DriftPoint]:
    """The latest score of each series, highest first, at most ``limit`` of them."""
    latest = [s.latest for s in drift_series(points)]
    return sorted(latest, key=lambda p: p.score, reverse=True)[:limit]


def drift_series(points: Iterable[DriftPoint]) -> list[DriftSeries]:
    """Points grouped per (device, model, version, metric), each series oldest first."""
    grouped: dict[tuple[str, str, str, str], DriftSeries] = {}
    for p in points:
        key = (p.device_id, p.model_name, p.model_version, p.metric)
        if key not in grouped:
            grouped[key] = DriftSeries(*key)
        grouped[key].points.append(p)
    for series in grouped.values():
        series.points.sort(key=lambda p: p.window_end)
    return [grouped[k] for k in sorted(grouped)]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        top = step * 10.0**exponent
        if top >= value:
            return top
    return 10.0 ** (exponent + 1)


def line_chart(
    series: Sequence[DriftSeries],
    *,
    threshold: float | None = None,
    width: int = 760,
    height: int = 260,
) -> str:
    """An inline SVG line chart of the series' scores over time (escaped, self-contained).

    Hand-written rather than a charting library: the page must work without a CDN and the
    chart is a few polylines, so ~50 lines of SVG beat shipping a JS bundle.
    """
    left, right, top, bottom = 48, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [p for s in series for p in s.points]
    parts = [
        f'<svg class="chart" role="img" aria-label="drift scores over time" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    if not points:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no drift scores</text>'
        )
        return "".join(parts) + "</svg>"
    t0 = min(p.window_end for p in points).timestamp()
    t1 = max(p.window_end for p in points).timestamp()
    span = (t1 - t0) or 1.0
    y_max = _nice_max(max([p.score for p in points] + [threshold or 0.0]))

    def x(p: DriftPoint) -> float:
        return left + plot_w * ((p.window_end.timestamp() - t0) / span if t1 > t0 else 0.5)

    def y(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    for k in range(5):  # horizontal grid and y labels
        value = y_max * k / 4
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" '
            f'y2="{y(value):.1f}"/><text class="axis" x="{left - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{value:.3g}</text>'
        )
    first = min(points, key=lambda p: p.window_end).window_end
    last = max(points, key=lambda p: p.window_end).window_end
    for when, anchor, pos in ((first, "start", left), (last, "end", left + plot_w)):
        parts.append(
            f'<text class="axis" x="{pos}" y="{height - 8}" text-anchor="{anchor}">'
            f"{when:%Y-%m-%d %H:%M:%S}</text>"
        )
    if threshold is not None:
        parts.append(
            f'<line class="threshold" x1="{left}" x2="{left + plot_w}" y1="{y(threshold):.1f}" '
            f'y2="{y(threshold):.1f}"><title>threshold {threshold:g}</title></line>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x(p):.1f},{y(p.score):.1f}" for p in s.points)
        label = html.escape(s.label)
        parts.append(
            f'<g class="series" data-series="{label}"><polyline fill="none" stroke="{color}" '
            f'stroke-width="2" points="{coords}"/>'
        )
        for p in s.points:
            parts.append(
                f'<circle cx="{x(p):.1f}" cy="{y(p.score):.1f}" r="3" fill="{color}">'
                f"<title>{label}: {p.score:.4g} at {p.window_end:%Y-%m-%d %H:%M:%S}</title>"
                "</circle>"
            )
        parts.append("</g>")
    return "".join(parts) + "</svg>"


def series_color(index: int) -> str:
    """The colour :func:`line_chart` gives series ``index`` (for the legend)."""
    return PALETTE[index % len(PALETTE)]


# ---------------------------------------------------------------- paging


@dataclass(frozen=True)
class Page:
    """One page of a paged list."""

    number: int  # 1-based
    size: int
    count: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.count / self.size))

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def has_previous(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages

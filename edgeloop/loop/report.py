"""The demo's report: ``summary.json``, a self-contained HTML file, and a rich table.

The HTML embeds its four plots as base64 PNGs (matplotlib, Agg backend) and its own CSS: no
CDN, no external file, readable offline. Each plot is a function of the ``Outcome`` alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeloop.loop.config import Outcome

PLOTS = ("rollout timeline", "latency per device", "drift scores over time", "accuracy")
_STATE_COLORS = {
    "NOT_STARTED": "#bbbbbb",
    "QUEUED": "#9ecae1",
    "IN_PROGRESS": "#4292c6",
    "DOWNLOADING": "#4292c6",
    "SUCCEEDED": "#31a354",
    "FAILED": "#de2d26",
}


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    return fig, ax


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _shade_stages(ax: Any, outcome: Outcome) -> None:
    """The loop's stages as alternating background bands, numbered (the legend names them)."""
    for i, stage in enumerate(outcome.stages):
        ax.axvspan(stage["start"], stage["end"], color="#f0f0f0" if i % 2 else "#fafafa", zorder=0)
        ax.text(
            (stage["start"] + stage["end"]) / 2,
            1.0,
            str(i + 1),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=7,
            color="#777777",
        )


def plot_rollout(outcome: Outcome) -> str:
    """Per device and deployment, its job states as bars from one state change to the next."""
    from matplotlib.patches import Patch

    fig, ax = _figure()
    end = max([e["t"] for e in outcome.timeline] + [s["end"] for s in outcome.stages] + [1.0])
    _shade_stages(ax, outcome)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for event in outcome.timeline:
        by_key.setdefault((event["deployment"], event["device_id"]), []).append(event)
    labels = []
    seen: dict[str, str] = {}
    for row, ((deployment, device), events) in enumerate(sorted(by_key.items())):
        labels.append(f"{device} · {deployment}")
        for i, event in enumerate(events):
            stop = events[i + 1]["t"] if i + 1 < len(events) else event["t"] + end * 0.02
            color = _STATE_COLORS.get(event["state"], "#756bb1")
            seen[event["state"]] = color
            ax.barh(row, max(stop - event["t"], end * 0.005), left=event["t"], color=color)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel("seconds since the loop started (bands: stages 1-7 of the table)")
    ax.set_title("rollout timeline: deploy job state per device", pad=14)
    ax.legend(
        handles=[Patch(color=c, label=s) for s, c in seen.items()], fontsize=7, loc="upper left"
    )
    return _png(fig)


def plot_latency(outcome: Outcome) -> str:
    """OIP request latency per device (box plot over every request it served)."""
    fig, ax = _figure()
    devices = [d for d in outcome.latency_ms if outcome.latency_ms[d]]
    if devices:
        ax.boxplot([outcome.latency_ms[d] for d in devices], showfliers=False)
        emulated = set(outcome.config.get("emulated", []))
        labels = [f"{d}\n(aarch64, qemu)" if d in emulated else d for d in devices]
        ax.set_xticks(range(1, len(devices) + 1), labels)
    ax.set_ylabel("ms per OIP request")
    ax.set_title("inference latency per device (through the OIP API)")
    return _png(fig)


def plot_drift(outcome: Outcome) -> str:
    """Each device's drift score per sketch window (at its end), with the alert threshold."""
    fig, ax = _figure()
    _shade_stages(ax, outcome)
    zero = datetime.fromisoformat(outcome.started_at) if outcome.started_at else None
    for device in outcome.config["devices"]:
        mine = sorted(
            (datetime.fromisoformat(s["window_end"]), s["score"])
            for s in outcome.drift_scores
            if s["device_id"] == device
        )
        if mine and zero is not None:
            xs = [(t - zero).total_seconds() for t, _ in mine]
            ax.plot(xs, [v for _, v in mine], "o-", label=device)
    ax.axhline(outcome.config["drift_threshold"], color="#de2d26", ls="--", label="threshold")
    ax.set_xlabel("seconds since the loop started (sketch window end)")
    ax.set_ylabel(f"{outcome.config['drift_metric']} score")
    ax.set_ylim(0, 1.05)
    ax.set_title("drift scores over time", pad=14)
    ax.legend(fontsize=7, loc="center left")
    return _png(fig)


def plot_accuracy(outcome: Outcome) -> str:
    """Accuracy on the held-out shifted data before and after the retrain (and clean, v1)."""
    fig, ax = _figure()
    names = ["clean, v1", "shifted, v1", "shifted, v2"]
    values = [outcome.accuracy_clean, outcome.accuracy_before, outcome.accuracy_after]
    bars = ax.bar(names, values, color=["#9ecae1", "#de2d26", "#31a354"])
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.3f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("top-1 accuracy (held-out)")
    ax.set_title("accuracy before / after the retrain")
    return _png(fig)


_PLOTTERS: dict[str, Callable[[Outcome], str]] = {
    "rollout timeline": plot_rollout,
    "latency per device": plot_latency,
    "drift scores over time": plot_drift,
    "accuracy": plot_accuracy,
}


def summary_rows(outcome: Outcome) -> list[tuple[str, str]]:
    """The summary table's rows (shared by the terminal table and the HTML report)."""
    cfg = outcome.config
    rows = [
        ("devices", ", ".join(cfg["devices"]) + f" (shifted: {cfg['shifted']})"),
        *(
            (f"{d} (emulated)", f"aarch64 under qemu-user, {cfg['device_profiles'][d]}")
            for d in cfg.get("emulated", [])
        ),
        ("profiles", ", ".join(cfg["profiles"])),
        ("v1 artifact", outcome.v1[:16]),
        *((f"compiled for {p}", c["verification"]) for p, c in outcome.compiled.items()),
        ("drift alerts", ", ".join(outcome.alert_devices) or "none"),
        (
            "max drift score",
            ", ".join(f"{d} {v:.2f}" for d, v in sorted(outcome.max_drift.items())),
        ),
        ("oracle labels", str(outcome.labeled)),
        ("retrain run", f"{outcome.retrain_state} (v{outcome.retrain_version})"),
        ("canary stages", " -> ".join(str(n) for n in outcome.canary_stages) or "-"),
        ("v2 artifact", outcome.v2[:16]),
        *(
            (f"v2 artifact for {p}", a[:16])
            for p, a in outcome.v2_variants.items()
            if p != cfg["host_profile"]
        ),
        ("accuracy clean (v1)", f"{outcome.accuracy_clean:.3f}"),
        (
            "accuracy shifted",
            f"{outcome.accuracy_before:.3f} -> {outcome.accuracy_after:.3f} "
            f"(needed +{cfg['margin']:.2f})",
        ),
        ("wall time", f"{outcome.seconds:.0f} s"),
    ]
    rows += [(f"check: {name}", "PASS" if ok else "FAIL") for name, ok in outcome.checks().items()]
    return rows


def render_html(outcome: Outcome) -> str:
    """The self-contained HTML report."""
    plots = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{plotter(outcome)}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, plotter in _PLOTTERS.items()
    )
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td class='{v.lower()}'>{html.escape(v)}</td></tr>"
        for k, v in summary_rows(outcome)
    )
    stages = "\n".join(
        f"<tr><td>{i}. {html.escape(s['name'])}</td><td>{s['start']:.1f}</td>"
        f"<td>{s['end'] - s['start']:.1f}</td></tr>"
        for i, s in enumerate(outcome.stages, 1)
    )
    verdict = "the loop did its job" if outcome.ok else "the loop did NOT do its job"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EdgeLoop demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }}
td.pass {{ color: #176d2c; font-weight: bold; }} td.fail {{ color: #b00; font-weight: bold; }}
figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>EdgeLoop demo: {html.escape(verdict)}</h1>
<p>Train, compile, canary rollout, OIP traffic, drift on one device, alert, oracle relabel,
retrain, canary redeploy; all on this machine with real services.</p>
<h2>Summary</h2><table>{rows}</table>
<h2>Stages</h2><table><tr><th>stage</th><th>start (s)</th><th>duration (s)</th></tr>
{stages}</table>
<h2>Plots</h2>{plots}
</body></html>
"""


def write_report(outcome: Outcome, report: Path) -> Path:
    """Write ``report`` (HTML) and ``summary.json`` next to it; returns the summary's path."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render_html(outcome), encoding="utf-8")
    summary = report.parent / "summary.json"
    summary.write_text(json.dumps(outcome.to_json(), indent=2, default=str))
    return summary


def print_summary(outcome: Outcome, console: Any) -> None:
    """The summary as a rich table on ``console``."""
    from rich.table import Table

    table = Table(title="EdgeLoop demo", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("result")
    for key, value in summary_rows(outcome):
        style = {"PASS": "green", "FAIL": "bold red"}.get(value, "")
        table.add_row(key, f"[{style}]{value}[/]" if style else value)
    console.print(table)

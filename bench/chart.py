"""The PNG chart: latency percentiles per target, one panel per (scenario, concurrency).

Grouped bars on a log scale: within each panel the groups are p50, p90, p99 and p99.9,
and each target has its own colour, so the distance between direct and any proxy reads
at a glance. Needs matplotlib (``pip install -e '.[bench]'``); without it the chart is
skipped with a note.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.stats import REPORTED


def matplotlib_missing() -> str | None:
    """Why the chart cannot be drawn, or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no chart drawn"
    return None


# Panels whose values span more than this ratio get a log axis; others stay linear from 0.
LOG_SCALE_SPAN = 5.0


def _values(doc: dict[str, Any], name: str, scenario: str, level: int) -> list[float] | None:
    """One target's reported percentiles in one cell, or None when it has no such cell."""
    for cell in doc["cells"]:
        if (cell["target"], cell["scenario"], cell["concurrency"]) == (name, scenario, level):
            values = [cell["latency_us"][p] for p, _ in REPORTED]
            return [v if v and not math.isnan(v) else math.nan for v in values]
    return None


def _panel(ax: Any, doc: dict[str, Any], names: list[str], scenario: str, level: int) -> None:
    """Grouped bars for one (scenario, concurrency): percentile groups, one bar per target."""
    width = 0.8 / max(1, len(names))
    seen: list[float] = []
    for i, name in enumerate(names):
        values = _values(doc, name, scenario, level)
        if values is None:
            continue
        seen += [v for v in values if not math.isnan(v)]
        ax.bar([k + i * width for k in range(len(REPORTED))], values, width, label=name)
    if seen and max(seen) / max(min(seen), 1.0) > LOG_SCALE_SPAN:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_formatter())
    ax.set_title(f"{scenario}, concurrency {level}", fontsize=10)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(REPORTED))])
    ax.set_xticklabels([p for p, _ in REPORTED])
    ax.grid(axis="y", which="both", alpha=0.3)


def _plain_formatter() -> Any:
    """Tick labels as plain microseconds with thousands separators."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _position: f"{value:,.0f}")


def draw(doc: dict[str, Any], path: Path) -> None:
    """Draw the chart for the results document into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios, levels = doc["options"]["scenarios"], doc["options"]["concurrency"]
    names = [n for n, info in doc["targets"].items() if info["status"] == "ran"]
    size = (4.2 * len(levels), 3.2 * len(scenarios) + 0.8)
    fig, axes = plt.subplots(len(scenarios), len(levels), figsize=size, squeeze=False)
    for row, scenario in enumerate(scenarios):
        for col, level in enumerate(levels):
            _panel(axes[row][col], doc, names, scenario, level)
        axes[row][0].set_ylabel("latency (µs)")
    machine = doc["machine"]
    fig.suptitle(
        f"gateway bench {doc['started_at']} · {machine['cpu_model']}, {machine['cores']} cores"
        f" · gateway workers {doc['options']['workers']} · latency per request (wrk)",
        y=0.995,
        fontsize=9,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.975),
        ncol=len(names),
        frameon=False,
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / size[1]))
    fig.savefig(path, dpi=110)
    plt.close(fig)

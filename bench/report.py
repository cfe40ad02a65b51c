"""From a finished run to what a person reads: the document, the checks, files, the chart.

The load-generator check lives here: wherever a proxy's rate is compared with direct's,
direct must run well above the gateway (else wrk, or the machine, is the limit and the
ratios mean nothing), and wrk's threads must not be pegged.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from bench import chart, goals, results
from bench.runner import Run
from bench.targets import ALL_TARGETS

# Direct must reach at least this multiple of the gateway's rate for ratios to mean much.
HEADROOM_RATIO = 1.5
# wrk using more than this share of the machine's cores may be what limits the rate.
LOADGEN_BUSY_SHARE = 0.5


def loadgen_checks(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Lines showing the load generator had headroom, and warnings where it did not."""
    lines, warnings = [], []
    for cell in doc["cells"]:
        if cell["target"] != "direct" or cell["scenario"] != "small" or cell["concurrency"] < 8:
            continue
        gateway = next(
            (
                c
                for c in doc["cells"]
                if c["target"] == "gateway"
                and (c["scenario"], c["concurrency"]) == ("small", cell["concurrency"])
            ),
            None,
        )
        cores = cell["loadgen_cores"] or 0.0
        line = (
            f"load generator: small c={cell['concurrency']}: direct {cell['rate']:,.0f} req/s"
            f" with wrk using {cores:.2f} of {doc['machine']['usable_cores']} cores"
        )
        if gateway is not None and gateway["rate"]:
            headroom = cell["rate"] / gateway["rate"]
            line += f", {headroom:.1f}x the gateway's rate"
            if headroom < HEADROOM_RATIO:
                warnings.append(
                    f"{line}: direct is not well above the gateway; "
                    "the load generator or the machine may be the bottleneck"
                )
        if cores > LOADGEN_BUSY_SHARE * doc["machine"]["usable_cores"]:
            warnings.append(f"{line}: wrk takes a large share of the machine")
        lines.append(line)
    return lines, warnings


def assemble(run: Run, started_at: datetime, wall_seconds: float) -> dict[str, Any]:
    """The results document for ``run``."""
    doc: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_seconds": round(wall_seconds, 1),
        "machine": results.machine(),
        "options": results.options_document(run.options),
        "targets": run.target_info,
        "cells": sorted(
            results.cell_documents([c.summary() for c in run.cells.values()]),
            key=lambda c: (c["scenario"], c["concurrency"], ALL_TARGETS.index(c["target"])),
        ),
        "client": sorted(
            results.client_documents(run.client),
            key=lambda c: (c["scenario"], ALL_TARGETS.index(c["target"])),
        ),
        "memory": run.memory,
        "slow_uploads": run.slow_uploads,
        "warnings": list(run.warnings),
    }
    doc["goals"] = goals.evaluate(doc)
    doc["checks"], loadgen_warnings = loadgen_checks(doc)
    doc["warnings"] += loadgen_warnings
    return doc


def save(
    doc: dict[str, Any], tables: str, results_dir: Path, started_at: datetime, draw: bool
) -> list[str]:
    """Write the JSON, the tables as text (and the chart); return where they went."""
    stamp = results.timestamp(started_at)
    notes = [f"results: {results.write(doc, results_dir, stamp)} (and latest.json)"]
    for name in (f"{stamp}.txt", "latest.txt"):
        (results_dir / name).write_text(tables + "\n")
    if not draw or not doc["cells"]:
        return notes
    missing = chart.matplotlib_missing()
    if missing is not None:
        return [*notes, f"chart: skipped: {missing}"]
    path = results_dir / f"{stamp}.png"
    chart.draw(doc, path)
    (results_dir / "latest.png").write_bytes(path.read_bytes())
    return [*notes, f"chart: {path} (and latest.png)"]

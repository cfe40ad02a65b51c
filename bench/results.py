"""The run's figures as one JSON-ready document, each compared with direct from the same run.

The document holds the machine, the options, every target's status, one entry per wrk
cell and per client timing run (each with ``vs_direct``: difference and ratio), the memory
test, the issue's goals and any warnings. It is written under ``bench/results/`` with a
timestamped name and as ``latest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from yarl import URL

from bench.client import ClientSamples
from bench.stats import REPORTED, difference, percentiles, ratio

COMPARED_CELL_FIGURES = ("rate", "cpu_seconds_per_1k")


def _compare(value: float | None, reference: float | None) -> dict[str, float | None]:
    """Difference and ratio against the reference."""
    return {"diff": difference(value, reference), "ratio": ratio(value, reference)}


def _cell_vs_direct(cell: dict[str, Any], direct: dict[str, Any] | None) -> dict[str, Any]:
    """Every figure of ``cell`` against direct's cell of the same scenario and concurrency."""
    if direct is None:
        return {}
    compared = {k: _compare(cell[k], direct[k]) for k in COMPARED_CELL_FIGURES}
    for name, _ in REPORTED:
        compared[name] = _compare(cell["latency_us"][name], direct["latency_us"][name])
    return compared


def cell_documents(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells with their comparison against direct added."""
    direct = {(c["scenario"], c["concurrency"]): c for c in cells if c["target"] == "direct"}
    for cell in cells:
        cell["vs_direct"] = _cell_vs_direct(
            cell, direct.get((cell["scenario"], cell["concurrency"]))
        )
    return cells


def client_documents(samples: dict[tuple[str, str], ClientSamples]) -> list[dict[str, Any]]:
    """Percentiles of each client timing run, compared with direct's."""
    documents: list[dict[str, Any]] = []
    for (target, scenario), s in samples.items():
        documents.append(
            {
                "target": target,
                "scenario": scenario,
                "requests": len(s.latency_us),
                "errors": s.errors,
                "statuses": {str(k): v for k, v in s.statuses.items()},
                "latency_us": percentiles(s.latency_us),
                "ttfb_us": percentiles(s.ttfb_us),
                "gap_us": percentiles(s.gap_us),
                "gap_samples": len(s.gap_us),
            }
        )
    direct = {d["scenario"]: d for d in documents if d["target"] == "direct"}
    for document in documents:
        reference = direct.get(document["scenario"])
        document["vs_direct"] = {
            figure: {
                name: _compare(document[figure][name], reference[figure][name])
                for name, _ in REPORTED
            }
            for figure in ("latency_us", "ttfb_us", "gap_us")
            if reference is not None
        }
    return documents


def _version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _tool_version(argv: list[str]) -> str | None:
    """The first line a tool prints about its version, or None when it is absent."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return None
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = None
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        memory_kib = int(meminfo.readline().split()[1])
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": memory_kib * 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "wrk": _tool_version(["wrk", "--version"]),
        "nginx": _tool_version(["nginx", "-v"]) or _tool_version(["/usr/sbin/nginx", "-v"]),
    }


def options_document(options: Any) -> dict[str, Any]:
    """The options as JSON-ready values, with any database password left out."""
    document = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()
    }
    if document.get("database_url"):
        url = URL(document["database_url"])
        document["database_url"] = str(url.with_password(None) if url.password else url)
    return document


def write(document: dict[str, Any], results_dir: Path, stamp: str) -> Path:
    """Write ``<stamp>.json`` and ``latest.json``; return the timestamped path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=False, default=str) + "\n"
    path = results_dir / f"{stamp}.json"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path


def timestamp(moment: datetime | None = None) -> str:
    """A file-name-safe UTC timestamp."""
    return (moment or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")

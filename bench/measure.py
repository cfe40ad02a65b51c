"""What a cell costs its target: CPU, memory and the gateway's own counters, around a run.

A :class:`Probe` is read before and after each wrk run; the difference, with wrk's
figures, goes into the cell's :class:`CellResult`, which sums its rounds. For gateway
targets the probe also scrapes ``/metrics`` so the report can show the statuses the
gateway answered and how often the entitlement cache hit.
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.load import WrkRun
from bench.procs import cpu_seconds, tree_pids
from bench.stats import histogram_percentiles, merge_histograms
from bench.targets import Target

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
PROXY_ROUTE_MARK = "/api/openrouter"


@dataclass(frozen=True, slots=True)
class GatewayCounters:
    """The gateway's request statuses (proxy route only) and entitlement cache results."""

    statuses: Counter[str]
    cache: Counter[str]
    active_streams: float | None


def scrape(metrics_url: str) -> GatewayCounters:
    """Read the counters the report needs from the gateway's ``/metrics``."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    statuses: Counter[str] = Counter()
    cache: Counter[str] = Counter()
    active: float | None = None
    for match in _SAMPLE.finditer(text):
        labels = dict(_LABEL.findall(match["labels"]))
        value = float(match["value"])
        if match["name"] == "gateway_requests_total" and PROXY_ROUTE_MARK in labels["route"]:
            statuses[labels["status"]] += int(value)
        elif match["name"] == "gateway_entitlement_cache_total":
            cache[labels["result"]] += int(value)
    active_match = re.search(r"^gateway_active_streams(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    if active_match:
        active = float(active_match[1])
    return GatewayCounters(statuses, cache, active)


@dataclass(frozen=True, slots=True)
class Probe:
    """Cumulative CPU of the target (and of PostgreSQL) and its counters, at one instant."""

    cpu_seconds: float
    db_cpu_seconds: float | None
    counters: GatewayCounters | None


def probe(target: Target, postmaster_pid: int | None) -> Probe:
    """Read the target's cumulative figures now."""
    db_cpu = None
    if target.metrics_url is not None and postmaster_pid is not None:
        db_cpu = cpu_seconds(tree_pids(postmaster_pid))
    counters = scrape(target.metrics_url) if target.metrics_url else None
    return Probe(cpu_seconds(target.child.pids()), db_cpu, counters)


@dataclass
class CellResult:
    """Every round of one (target, scenario, concurrency) cell, summed."""

    target: str
    scenario: str
    concurrency: int
    runs: list[WrkRun] = field(default_factory=list)
    cpu_seconds: float = 0.0
    db_cpu_seconds: float | None = None
    statuses: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)

    def add(self, run: WrkRun, before: Probe, after: Probe) -> None:
        """Fold in one round."""
        self.runs.append(run)
        self.cpu_seconds += after.cpu_seconds - before.cpu_seconds
        if before.db_cpu_seconds is not None and after.db_cpu_seconds is not None:
            spent = after.db_cpu_seconds - before.db_cpu_seconds
            self.db_cpu_seconds = (self.db_cpu_seconds or 0.0) + spent
        if before.counters is not None and after.counters is not None:
            self.statuses.update(after.counters.statuses - before.counters.statuses)
            self.cache.update(after.counters.cache - before.counters.cache)

    def summary(self) -> dict[str, Any]:
        """The cell's figures, JSON-ready."""
        requests = sum(r.requests for r in self.runs)
        seconds = sum(r.duration_seconds for r in self.runs)
        errors: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        for run in self.runs:
            errors.update(run.errors)
            statuses.update({str(k): v for k, v in run.statuses.items()})
        histogram = merge_histograms(r.histogram for r in self.runs)
        loadgen_cpu = sum(r.loadgen_cpu_seconds for r in self.runs)
        return {
            "target": self.target,
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "rounds": len(self.runs),
            "requests": requests,
            "seconds": seconds,
            "rate": requests / seconds if seconds else 0.0,
            "latency_us": histogram_percentiles(histogram),
            "timed_requests": sum(histogram.values()),
            # wrk's own percentiles, corrected for coordinated omission; per round.
            "wrk_corrected_latency_us": [r.wrk_corrected_us for r in self.runs],
            "cpu_seconds_per_1k": _per_1k(self.cpu_seconds, requests),
            "db_cpu_seconds_per_1k": _per_1k(self.db_cpu_seconds, requests),
            "errors": dict(errors),
            "error_total": sum(errors.values()),
            "statuses": dict(statuses),
            "gateway_statuses": dict(self.statuses),
            "cache": dict(self.cache),
            # Cores wrk kept busy: near the machine's count would make wrk the limit.
            "loadgen_cores": loadgen_cpu / seconds if seconds else None,
        }


def _per_1k(seconds: float | None, requests: int) -> float | None:
    """CPU seconds per 1,000 requests."""
    if seconds is None or not requests:
        return None
    return seconds / requests * 1000

"""Percentiles: from raw samples, and merged across rounds from wrk's percentile grids.

wrk reports a grid of percentiles per run (see ``wrk.lua``). A round's grid point at
percentile p_k stands for the share (p_k - p_{k-1}) of that round's requests; the merged
distribution weights each round by its request count, so a busy round counts for more.
With one round the merged percentiles are exactly wrk's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The percentiles every figure reports, and the names used in JSON and tables.
REPORTED = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


@dataclass(frozen=True, slots=True)
class Grid:
    """One run's percentiles: (percentile, value) pairs in ascending percentile order."""

    count: int
    points: Sequence[tuple[float, float]]


def weighted_percentile(weighted: Sequence[tuple[float, float]], percentile: float) -> float:
    """The smallest value whose cumulative weight reaches ``percentile`` of the total."""
    ordered = sorted(weighted)
    total = sum(weight for _, weight in ordered)
    if total <= 0:
        return math.nan
    target = total * percentile / 100.0
    cumulative = 0.0
    for value, weight in ordered:
        cumulative += weight
        # A relative tolerance absorbs the float error of summing many small weights.
        if cumulative >= target * (1 - 1e-12):
            return value
    return ordered[-1][0]


def merge_grids(grids: Iterable[Grid]) -> dict[str, float]:
    """The reported percentiles of all the grids' requests taken together."""
    weighted: list[tuple[float, float]] = []
    for grid in grids:
        previous = 0.0
        for percentile, value in grid.points:
            weighted.append((value, grid.count * (percentile - previous) / 100.0))
            previous = percentile
    return {name: weighted_percentile(weighted, p) for name, p in REPORTED}


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """The reported percentiles of raw samples (nearest rank)."""
    if not samples:
        return {name: math.nan for name, _ in REPORTED}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        name: ordered[min(last, max(0, math.ceil(p / 100.0 * len(ordered)) - 1))]
        for name, p in REPORTED
    }


def difference(value: float | None, reference: float | None) -> float | None:
    """``value - reference``, None when either is missing."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return None
    return value - reference


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, None when either is missing or the reference is zero."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return None
    return value / reference if reference else None

"""Percentiles: from raw samples, and from latency histograms merged across rounds.

``wrk.lua`` times every request and reports a histogram (microsecond buckets, 1 us wide
below 1 ms and 3 significant digits above); the rounds of a cell are merged by adding
counts, so the cell's percentiles are those of all its requests together.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

# The percentiles every figure reports, and the names used in JSON and tables.
REPORTED = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


Histogram = dict[int, int]


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram:
    """Bucket-wise sum of the histograms."""
    total: Counter[int] = Counter()
    for histogram in histograms:
        total.update(histogram)
    return dict(total)


def histogram_percentiles(histogram: Histogram) -> dict[str, float]:
    """The reported percentiles of a histogram (nearest rank, bucket values)."""
    buckets = sorted(histogram.items())
    count = sum(n for _, n in buckets)
    result = {}
    for name, p in REPORTED:
        rank, seen = max(1, math.ceil(p / 100.0 * count)), 0
        result[name] = math.nan
        for value, n in buckets:
            seen += n
            if seen >= rank:
                result[name] = float(value)
                break
    return result


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

"""The figures issues 5, 3 and 14 set for the gateway, checked against this run's results.

Each goal is computed only from figures the run has; a goal the run cannot judge (no
LiteLLM, a single worker, no memory test) says so instead of passing.
"""

from __future__ import annotations

from typing import Any

SMALL, STREAM = "small", "stream"


def _cell(doc: dict[str, Any], target: str, scenario: str, c: int) -> dict[str, Any] | None:
    """One wrk cell of the results, or None."""
    return next(
        (
            x
            for x in doc["cells"]
            if (x["target"], x["scenario"], x["concurrency"]) == (target, scenario, c)
        ),
        None,
    )


def _client(doc: dict[str, Any], target: str, scenario: str) -> dict[str, Any] | None:
    """One client timing run of the results, or None."""
    return next(
        (x for x in doc["client"] if (x["target"], x["scenario"]) == (target, scenario)), None
    )


def _added(doc: dict[str, Any], target: str, percentile: str) -> float | None:
    """Latency ``target`` adds over direct at concurrency 1, small, from wrk."""
    cell = _cell(doc, target, SMALL, 1)
    if cell is None or not cell["vs_direct"]:
        return None
    value: float | None = cell["vs_direct"][percentile]["diff"]
    return value


def _goal(name: str, figure: str, met: bool | None) -> dict[str, Any]:
    """One goal's line."""
    return {"goal": name, "figure": figure, "met": met}


def _latency_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Added latency at concurrency 1 and against the floor and LiteLLM."""
    goals: list[dict[str, Any]] = []
    if not doc["cells"]:
        return goals  # no throughput rounds in this run
    p50, p99 = _added(doc, "gateway", "p50"), _added(doc, "gateway", "p99")
    floor = _added(doc, "aiohttp-floor", "p50")
    litellm = _added(doc, "litellm", "p50")
    if p50 is not None:
        goals.append(_goal("added p50 at c=1 <= 200 us", f"{p50:+.0f} us", p50 <= 200))
    if p50 is not None and floor:
        share = p50 / floor
        goals.append(_goal("<= 1.2x the floor's added p50", f"{share:.2f}x", share <= 1.2))
    if p99 is not None:
        goals.append(_goal("added p99 at c=1 <= 600 us", f"{p99:+.0f} us", p99 <= 600))
    if p50 and litellm is not None:
        less = litellm / p50
        goals.append(_goal(">= 15x less added latency than LiteLLM", f"{less:.1f}x", less >= 15))
    else:
        goals.append(_goal(">= 15x less added latency than LiteLLM", "no LiteLLM run", None))
    return goals


def _throughput_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Throughput at concurrency 8 and gateway-cold's cost."""
    goals = []
    cell = _cell(doc, "gateway", SMALL, 8)
    if cell is not None and cell["vs_direct"]:
        share = cell["vs_direct"]["rate"]["ratio"]
        workers = doc["options"]["workers"]
        goals.append(
            _goal(
                f">= 0.42x direct's rate at c=8 ({workers} worker(s))",
                f"{share:.2f}x",
                share >= 0.42,
            )
        )
    cold, warm = _cell(doc, "gateway-cold", SMALL, 1), _cell(doc, "gateway", SMALL, 1)
    if cold is not None and warm is not None:
        extra = cold["latency_us"]["p50"] - warm["latency_us"]["p50"]
        goals.append(_goal("cache miss adds <= 2 ms at p50", f"{extra:+.0f} us", extra <= 2000))
    return goals


def _stream_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """No chunk held back, and the first byte soon after direct's."""
    stream = _client(doc, "gateway", STREAM)
    if stream is None or not stream["vs_direct"]:
        return []
    gap = stream["vs_direct"]["gap_us"]["p99"]["diff"]
    ttfb = stream["vs_direct"]["ttfb_us"]["p50"]["diff"]
    goals = []
    if gap is not None:
        goals.append(_goal("added chunk gap p99 <= 200 us", f"{gap:+.0f} us", gap <= 200))
    if ttfb is not None:
        goals.append(_goal("first byte p50 <= 250 us after direct", f"{ttfb:+.0f} us", ttfb <= 250))
    return goals


def _metering_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What metering costs (issues 3 and 14): the gateway against itself with metering
    off, in every cell both ran above concurrency 1. Issue 14's goal is at most 10% of
    throughput; CPU per request (the gateway's and PostgreSQL's) is shown beside it, as it
    tells the cost where the upstream's pace is the limit (stream, mix)."""
    goals = []
    for cell in doc["cells"]:
        if cell["target"] != "gateway" or cell["concurrency"] == 1:
            continue
        scenario, c = cell["scenario"], cell["concurrency"]
        unmetered = _cell(doc, "gateway-unmetered", scenario, c)
        if unmetered is None or not unmetered["rate"]:
            continue
        throughput = 1 - cell["rate"] / unmetered["rate"]
        cpu = _cpu_per_request(cell) / _cpu_per_request(unmetered) - 1
        goals.append(
            _goal(
                f"metering costs <= 10% of throughput ({scenario}, c={c})",
                f"{throughput:.1%} of throughput, {cpu:+.1%} CPU a request",
                throughput <= 0.10,
            )
        )
    return goals


def _cpu_per_request(cell: dict[str, Any]) -> float:
    """Seconds of CPU per 1,000 requests: the target's, plus PostgreSQL's."""
    return float(cell["cpu_seconds_per_1k"]) + float(cell["db_cpu_seconds_per_1k"] or 0)


def _memory_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Open streams without errors, under 150 MB."""
    entry = next((m for m in doc["memory"] if m["target"] == "gateway"), None)
    if entry is None or "failed" in entry:
        return []
    streams, failed = entry["streams"], sum(entry["errors"].values())
    megabytes = entry["peak_rss_bytes"] / 2**20
    name = f"{streams} open streams: no errors, < 150 MB"
    figure = f"{failed} errors, {megabytes:.0f} MB, {entry['peak_open']} open at once"
    met = failed == 0 and megabytes < 150 if streams >= 1000 else None
    return [_goal(name, figure + ("" if streams >= 1000 else " (goal needs 1000)"), met)]


def _slow_upload_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Slow 10 MB uploads with bad keys: the gateway stays under 150 MB."""
    goals = []
    for entry in doc.get("slow_uploads", []):
        if entry["target"] != "gateway" or "failed" in entry:
            continue
        connections, megabytes = entry["connections"], entry["peak_rss_bytes"] / 2**20
        name = f"{connections} {entry['variant']} 10 MB uploads, bad key: < 150 MB"
        answer = entry["answer_401_ms"]["p50"]
        figure = (
            f"{megabytes:.0f} MB, {entry['answered_401']} 401s"
            + (f" after {answer:.0f} ms p50" if answer is not None else "")
            + f", {entry['closed_by_gateway']} closed by the gateway"
        )
        met = megabytes < 150 if connections >= 100 else None
        goals.append(_goal(name, figure + ("" if connections >= 100 else " (goal needs 100)"), met))
    return goals


def evaluate(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal the run can judge, with the figure reached."""
    return [
        *_latency_goals(doc),
        *_throughput_goals(doc),
        *_stream_goals(doc),
        *_metering_goals(doc),
        *_memory_goals(doc),
        *_slow_upload_goals(doc),
    ]

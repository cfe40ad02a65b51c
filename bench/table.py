"""The terminal tables: every figure with its difference and ratio against direct.

A figure reads ``value +diff xratio``: ``612 +150 x1.32`` under p50 µs means 612 µs,
150 µs more than direct, 1.32 times direct's. Direct's own row shows the bare values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.stats import REPORTED
from bench.targets import ALL_TARGETS

MIB = 2**20


def _number(value: float | None, decimals: int = 0) -> str:
    """A figure with thousands separators, or a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{decimals}f}"


def figure(value: float | None, compared: dict[str, Any] | None, decimals: int = 0) -> str:
    """``value +diff xratio`` (just the value when there is nothing to compare with)."""
    text = _number(value, decimals)
    if not compared or compared.get("diff") is None:
        return text
    diff, times = compared["diff"], compared["ratio"]
    ratio_text = f" x{times:.2f}" if times is not None else ""
    return f"{text} {diff:+,.{decimals}f}{ratio_text}"


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to fit; the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        """One padded row."""
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _order(target: str) -> int:
    """Position of a target in the tables: direct first, then as ALL_TARGETS lists them."""
    return ALL_TARGETS.index(target) if target in ALL_TARGETS else len(ALL_TARGETS)


def _miss_share(cache: dict[str, int]) -> str:
    """The share of entitlement lookups that missed the cache."""
    total = sum(cache.values())
    return f"{cache.get('miss', 0) / total:.0%}" if total else ""


def _cell_row(cell: dict[str, Any]) -> list[str]:
    """One target's line of a wrk block."""
    vs = cell["vs_direct"] if cell["target"] != "direct" else {}
    latency = [figure(cell["latency_us"][n], vs.get(n)) for n, _ in REPORTED]
    db = cell["db_cpu_seconds_per_1k"]
    socket_errors = sum(n for kind, n in cell["errors"].items() if kind != "status")
    non_200 = {s: n for s, n in cell["statuses"].items() if s != "200"}
    gateway_non_200 = {s: n for s, n in cell["gateway_statuses"].items() if s != "200"}
    return [
        cell["target"],
        figure(cell["rate"], vs.get("rate")),
        *latency,
        figure(cell["cpu_seconds_per_1k"], vs.get("cpu_seconds_per_1k"), 3),
        _number(db, 3) if db is not None else "",
        _miss_share(cell["cache"]),
        str(socket_errors),
        _statuses(non_200),
        _statuses(gateway_non_200),
    ]


def _statuses(counts: dict[str, int]) -> str:
    """``17x499, 3x500``."""
    return ", ".join(f"{n}x{status}" for status, n in sorted(counts.items()))


def wrk_tables(doc: dict[str, Any]) -> str:
    """One block per (scenario, concurrency)."""
    header = [
        "target",
        "req/s",
        *(f"{n} µs" for n, _ in REPORTED),
        "CPU s/1k",
        "db s/1k",
        "miss",
        "sock err",
        "non-200",
        "gateway logged",
    ]
    blocks = []
    opts = doc["options"]
    for scenario in opts["scenarios"]:
        for c in opts["concurrency"]:
            cells = [x for x in doc["cells"] if (x["scenario"], x["concurrency"]) == (scenario, c)]
            if not cells:
                continue
            title = (
                f"{scenario} · concurrency {c} · wrk, {cells[0]['rounds']} round(s) x "
                f"{opts['duration_seconds']} s"
            )
            blocks.append(title + "\n" + render(header, [_cell_row(x) for x in cells]))
    return "\n\n".join(blocks)


def client_table(doc: dict[str, Any]) -> str:
    """Client timings at concurrency 1: latency, first byte and chunk gaps."""
    header = [
        "scenario / target",
        "n",
        "latency p50",
        "latency p99",
        "TTFB p50",
        "TTFB p99",
        "gap p50",
        "gap p99",
    ]
    rows = []
    for x in doc["client"]:
        vs = x["vs_direct"] if x["target"] != "direct" else {}
        cells = [
            figure(x[f][p], vs.get(f, {}).get(p))
            for f in ("latency_us", "ttfb_us", "gap_us")
            for p in ("p50", "p99")
        ]
        if x["scenario"] != "stream":
            cells[2:] = ["", "", "", ""]
        rows.append([f"{x['scenario']} / {x['target']}", str(x["requests"]), *cells])
    title = "client timing (µs) · concurrency 1 · aiohttp client on uvloop"
    return title + "\n" + render(header, rows)


def resources_table(doc: dict[str, Any]) -> str:
    """Each target's processes and memory at the end of the throughput phase."""
    header = ["target", "status", "processes", "peak RSS MiB", "RSS MiB"]
    rows = []
    for name, info in sorted(doc["targets"].items(), key=lambda item: _order(item[0])):
        if info["status"] != "ran":
            reason = info.get("reason", "").splitlines()[0][:90]
            rows.append([name, f"{info['status']}: {reason}", "", "", ""])
            continue
        rows.append(
            [
                name,
                "ran",
                str(info.get("processes", "")),
                _number(info.get("peak_rss_bytes", 0) / MIB, 1),
                _number(info.get("rss_bytes", 0) / MIB, 1),
            ]
        )
    return "targets\n" + render(header, rows)


def memory_table(doc: dict[str, Any]) -> str:
    """The open-streams test."""
    header = [
        "target",
        "streams",
        "ok",
        "peak open",
        "errors",
        "RSS before",
        "peak RSS",
        "RSS after",
        "fds before/after",
        "active after",
    ]
    rows = []
    for m in doc["memory"]:
        if "failed" in m:
            rows.append([m["target"], "failed: " + m["failed"].splitlines()[0][:80]] + [""] * 8)
            continue
        before, after = m["before"], m["after"]
        rows.append(
            [
                m["target"],
                str(m["streams"]),
                str(m["completed"]),
                str(m["peak_open"]),
                str(m["errors"] or 0),
                f"{before['rss_bytes'] / MIB:.1f} MiB",
                f"{m['peak_rss_bytes'] / MIB:.1f} MiB",
                f"{after['rss_bytes'] / MIB:.1f} MiB",
                f"{before['open_fds']}/{after['open_fds']}",
                _number(after.get("active_streams")),
            ]
        )
    return "memory · streams held open at once\n" + render(header, rows)


def _spread_text(spread: dict[str, float | None], scale: float = 1.0, decimals: int = 0) -> str:
    """``median / max`` of a spread, scaled, or a dash."""
    middle, top = spread.get("p50"), spread.get("max")
    if middle is None or top is None:
        return "-"
    return f"{_number(middle * scale, decimals)} / {_number(top * scale, decimals)}"


def slow_uploads_table(doc: dict[str, Any]) -> str:
    """The slow-uploads test: bad keys, 10 MB bodies, one fresh gateway per row."""
    header = [
        "target",
        "variant",
        "conns",
        "401",
        "401 after ms p50/max",
        "other",
        "FIN",
        "FIN after s p50/max",
        "reset",
        "reset after s p50/max",
        "sent MB p50/max",
        "all sent",
        "open at end",
        "RSS before",
        "peak RSS",
        "RSS after",
        "CPU s",
    ]
    rows = []
    for u in doc["slow_uploads"]:
        if "failed" in u:
            failed = "failed: " + u["failed"].splitlines()[0][:80]
            rows.append([u["target"], u["variant"], failed] + [""] * (len(header) - 3))
            continue
        others = {s: n for s, n in u["statuses"].items() if s != "401"}
        others.update({f"no answer ({k})": n for k, n in u["errors"].items()})
        if u["no_answer"]:
            others["none"] = u["no_answer"]
        rows.append(
            [
                u["target"],
                u["variant"],
                str(u["connections"]),
                str(u["answered_401"]),
                _spread_text(u["answer_401_ms"], decimals=1),
                _statuses(others),
                str(u["fin"]),
                _spread_text(u["fin_after_s"], decimals=2),
                str(u["reset"]),
                _spread_text(u["reset_after_s"], decimals=2),
                _spread_text(u["sent_bytes"], 1e-6, 1),
                str(u["body_sent_all"]),
                str(u["open_at_end"]),
                f"{u['before']['rss_bytes'] / MIB:.1f} MiB",
                f"{u['peak_rss_bytes'] / MIB:.1f} MiB",
                f"{u['after']['rss_bytes'] / MIB:.1f} MiB",
                _number(u["cpu_seconds"], 2),
            ]
        )
    limit = f", each run at most {doc['options']['slow_upload_seconds']:g} s"
    title = (
        "slow uploads · Content-Length 10,000,000 with Authorization: Bearer not-a-key · "
        f"slow: 64 KiB every 100 ms, fast: as fast as the socket takes it{limit}"
    )
    return title + "\n" + render(header, rows)


def goals_table(doc: dict[str, Any]) -> str:
    """Issue 5's goals and the figures reached."""
    marks = {True: "met", False: "NOT MET", None: "n/a"}
    rows = [[g["goal"], g["figure"], marks[g["met"]]] for g in doc["goals"]]
    return "goals of issues 5, 3 and 14 (gateway)\n" + render(["goal", "reached", ""], rows)


def full_report(doc: dict[str, Any]) -> str:
    """Everything for the terminal."""
    parts = [wrk_tables(doc)] if doc["cells"] else []
    if doc["client"]:
        parts.append(client_table(doc))
    if doc["targets"]:
        parts.append(resources_table(doc))
    if doc["memory"]:
        parts.append(memory_table(doc))
    if doc.get("slow_uploads"):
        parts.append(slow_uploads_table(doc))
    if doc["goals"]:
        parts.append(goals_table(doc))
    if doc["checks"]:
        parts.append("\n".join(doc["checks"]))
    if doc["warnings"]:
        parts.append("\n".join(f"WARNING: {w}" for w in doc["warnings"]))
    return "\n\n".join(parts)

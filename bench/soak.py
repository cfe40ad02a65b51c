"""A soak: a steady request mix against one gateway for N minutes, with a PostgreSQL restart.

``python -m bench.soak --minutes 10`` starts a dedicated PostgreSQL (the ``pgserver``
wheel's binaries, loopback TCP, run as the ``pgserver`` user when we are root), migrates
and seeds it, starts the fake upstream and one ``python -m gateway serve``, then sends a
steady rate of requests (70% plain completions, 30% streams, 5% of the streams abandoned
by the client after their first content chunk) with bounded concurrency. Half way through,
PostgreSQL is crashed (``pg_ctl stop -m immediate``) and started again ~5 s later.

At the end it reports errors by phase (before / during / after the restart), p50/p99
latency per minute, the gateway's RSS every 10 s, and checks the charges: every request
whose client received the upstream's usage must be in ``llm_usage`` at the upstream's cost,
abandoned streams that never reached it at 0, ``credits_used_microdollars`` must equal the
sum, and the set of ``llm_usage.request_id`` must equal the X-Request-Id of every response
the gateway answered with 200. JSON and a text report go to ``bench/results``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg

from bench.database import seed
from bench.postgres import HOST, PostgresCluster
from bench.procs import free_port, ready_or_stop, rss_bytes, spawn, stop_leftovers
from gateway.config import load_defaults
from gateway.platform.migrations import migrate

MODEL: Final = "openai/gpt-4o-mini"
UPSTREAM_KEY: Final = "sk-or-v1-soak-upstream-key-not-a-secret"
PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = PROJECT_ROOT / "bench" / "results"
COST_USD: Final = 0.00042
COST_MICRODOLLARS: Final = round(COST_USD * 1_000_000)
STREAM_CHUNKS: Final = 5
STREAM_INTERVAL_SECONDS: Final = 0.02
REQUEST_TIMEOUT_SECONDS: Final = 30.0
RSS_INTERVAL_SECONDS: Final = 10.0
PG_DOWN_SECONDS: Final = 5.0
# Requests started this long after PostgreSQL is back still count as "during".
RECOVERY_GRACE_SECONDS: Final = 10.0
FLUSH_WAIT_SECONDS: Final = 60.0


# --- PostgreSQL of our own -------------------------------------------------------------------


class Postgres(PostgresCluster):
    """The soak's server: the defaults (fsync on), in a directory named for the soak."""

    TEMP_PREFIX = "gw-soak-pg-"


# --- The load --------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it."""

    t: float  # seconds since the load started
    kind: str  # plain | stream | abandon
    status: int | None = None
    error: str | None = None
    latency: float | None = None  # full response (stream: through [DONE]); None if abandoned
    request_id: str | None = None
    usage_seen: bool = False
    phase: str = ""


@dataclass
class Timeline:
    """When PostgreSQL went down and came back (seconds since the load started)."""

    crash_at: float | None = None
    down_at: float | None = None
    up_at: float | None = None

    def phase(self, t: float) -> str:
        if self.crash_at is None or t < self.crash_at:
            return "before"
        if self.up_at is None or t < self.up_at + RECOVERY_GRACE_SECONDS:
            return "during"
        return "after"


@dataclass
class Load:
    url: str
    tokens: list[str]
    rate: float
    seconds: float
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0  # arrivals dropped because `concurrency` requests were in flight


async def _one(session: aiohttp.ClientSession, load: Load, out: Outcome, token: str) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 32,
    }
    if out.kind != "plain":
        body["stream"] = True
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    try:
        async with session.post(load.url, json=body, headers=headers) as resp:
            out.status = resp.status
            out.request_id = resp.headers.get("X-Request-Id")
            if resp.status != 200 or out.kind == "plain":
                data = await resp.read()
                if resp.status == 200:
                    usage = json.loads(data).get("usage") or {}
                    out.usage_seen = "cost" in usage
                out.latency = time.monotonic() - started
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    out.latency = time.monotonic() - started
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    out.usage_seen = True
                content = any((c.get("delta") or {}).get("content") for c in chunk["choices"])
                if out.kind == "abandon" and content:
                    resp.close()  # drop the connection mid-stream
                    return
            else:
                out.error = "stream ended without [DONE]"
    except Exception as exc:  # every failure is a data point
        out.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_load(load: Load, timeline: Timeline, t0: float) -> None:
    """Open-loop arrivals at `rate`, at most `concurrency` in flight, stops after `seconds`."""
    rng = random.Random(20261125)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=load.concurrency)
    in_flight: set[asyncio.Task[None]] = set()
    total = int(load.rate * load.seconds)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for i in range(total):
            due = t0 + i / load.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - t0 > load.seconds + 5:
                break
            if len(in_flight) >= load.concurrency:
                load.skipped += 1
                continue
            r = rng.random()
            kind = "plain" if r < 0.70 else ("abandon" if r < 0.70 + 0.30 * 0.05 else "stream")
            t = time.monotonic() - t0
            out = Outcome(t=t, kind=kind, phase=timeline.phase(t))
            load.outcomes.append(out)
            task = asyncio.create_task(_one(session, load, out, load.tokens[i % len(load.tokens)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_SECONDS + 5)


async def restart_postgres(pg: Postgres, at: float, timeline: Timeline, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
    timeline.crash_at = time.monotonic() - t0
    await pg.crash()
    timeline.down_at = time.monotonic() - t0
    await asyncio.sleep(PG_DOWN_SECONDS)
    await pg.start()
    timeline.up_at = time.monotonic() - t0


async def sample_rss(
    pids: Any, samples: list[tuple[float, int]], t0: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(pids())))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RSS_INTERVAL_SECONDS)
    samples.append((round(time.monotonic() - t0, 1), rss_bytes(pids())))


# --- Checking the charges --------------------------------------------------------------------


async def read_charges(database_url: str, expected_rows: int) -> dict[str, Any]:
    """Wait for the gateway's batches to land (row count stable), then read the totals."""
    deadline = time.monotonic() + FLUSH_WAIT_SECONDS
    last, stable = -1, 0
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            count = await conn.fetchval("SELECT count(*) FROM llm_usage")
            stable = stable + 1 if count == last else 0
            if (stable and count >= expected_rows) or stable >= 5 or time.monotonic() > deadline:
                break
            last = count
            await asyncio.sleep(1.0)
        totals = await conn.fetchrow(
            "SELECT count(*) AS rows, coalesce(sum(cost_microdollars), 0)::bigint AS cost,"
            " count(*) FILTER (WHERE cost_microdollars > 0) AS charged_rows,"
            " count(*) FILTER (WHERE cancelled) AS cancelled_rows,"
            " count(*) FILTER (WHERE cancelled AND cost_microdollars > 0) AS cancelled_charged,"
            " count(DISTINCT cost_microdollars) FILTER (WHERE cost_microdollars > 0)"
            " AS distinct_costs FROM llm_usage"
        )
        used = await conn.fetchval(
            "SELECT coalesce(sum(credits_used_microdollars), 0)::bigint FROM organizations"
        )
        rows = await conn.fetch("SELECT request_id, cost_microdollars FROM llm_usage")
    finally:
        await conn.close()
    return {
        **dict(totals),
        "credits_used": used,
        "by_request": {r["request_id"]: r["cost_microdollars"] for r in rows},
    }


# --- Figures ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def figures(
    load: Load, timeline: Timeline, rss: list[tuple[float, int]], db: dict[str, Any], args: Any
) -> dict[str, Any]:
    outs = load.outcomes
    phases: dict[str, dict[str, Any]] = {}
    for name in ("before", "during", "after"):
        group = [o for o in outs if o.phase == name]
        non2xx = sum(1 for o in group if o.status is not None and not 200 <= o.status < 300)
        exc = sum(1 for o in group if o.error is not None)
        statuses: dict[str, int] = {}
        for o in group:
            key = str(o.status) if o.status is not None else "none"
            statuses[key] = statuses.get(key, 0) + 1
        errors: dict[str, int] = {}
        for o in group:
            if o.error:
                errors[o.error[:80]] = errors.get(o.error[:80], 0) + 1
        phases[name] = {
            "requests": len(group),
            "non_2xx": non2xx,
            "exceptions": exc,
            "error_rate": round((non2xx + exc) / len(group), 6) if group else None,
            "statuses": statuses,
            "exception_kinds": errors,
        }
    per_minute = []
    minutes = int(load.seconds // 60) + 1
    for m in range(minutes):
        lat = [
            o.latency
            for o in outs
            if o.latency is not None and o.status == 200 and m * 60 <= o.t < (m + 1) * 60
        ]
        if not lat:
            continue
        plain = [
            o.latency
            for o in outs
            if o.kind == "plain"
            and o.latency is not None
            and o.status == 200
            and m * 60 <= o.t < (m + 1) * 60
        ]
        per_minute.append(
            {
                "minute": m,
                "requests": len(lat),
                "p50_ms": _ms(_pct(lat, 0.50)),
                "p99_ms": _ms(_pct(lat, 0.99)),
                "plain_p50_ms": _ms(_pct(plain, 0.50)),
                "plain_p99_ms": _ms(_pct(plain, 0.99)),
            }
        )
    all_lat = [o.latency for o in outs if o.latency is not None and o.status == 200]
    # Charges: what the client saw decides what must have been charged.
    answered = {o.request_id: o for o in outs if o.status == 200 and o.request_id}
    expected_charged = sum(1 for o in answered.values() if o.usage_seen)
    expected_cost = expected_charged * COST_MICRODOLLARS
    in_db = db["by_request"]
    missing = [rid for rid in answered if rid not in in_db]
    extra = [rid for rid in in_db if rid not in answered]
    wrong = [
        rid
        for rid, o in answered.items()
        if rid in in_db and in_db[rid] != (COST_MICRODOLLARS if o.usage_seen else 0)
    ]
    abandoned = [o for o in outs if o.kind == "abandon"]
    rss_mib = [(t, round(b / 2**20, 1)) for t, b in rss]
    steady = [b for t, b in rss_mib if t >= 60] or [b for _, b in rss_mib]
    charges = {
        "cost_per_completion_microdollars": COST_MICRODOLLARS,
        "answered_200": len(answered),
        "client_saw_usage": expected_charged,
        "expected_cost_microdollars": expected_cost,
        "llm_usage_rows": db["rows"],
        "llm_usage_sum_cost_microdollars": db["cost"],
        "credits_used_microdollars": db["credits_used"],
        "charged_rows": db["charged_rows"],
        "cancelled_rows": db["cancelled_rows"],
        "cancelled_and_charged_rows": db["cancelled_charged"],
        "distinct_nonzero_costs": db["distinct_costs"],
        "answered_without_row": len(missing),
        "rows_without_answer": len(extra),
        "rows_with_wrong_cost": len(wrong),
        "examples": {"missing": missing[:5], "extra": extra[:5], "wrong": wrong[:5]},
        "exact": db["cost"] == expected_cost == db["credits_used"]
        and db["rows"] == len(answered)
        and not missing
        and not extra
        and not wrong,
    }
    return {
        "started_at": args.started_at,
        "settings": {
            "minutes": args.minutes,
            "rate_per_second": load.rate,
            "concurrency": load.concurrency,
            "organizations": args.orgs,
            "mix": "70% plain, 30% stream (5% of streams abandoned after the first chunk)",
            "stream_chunks": STREAM_CHUNKS,
            "chunk_interval_seconds": STREAM_INTERVAL_SECONDS,
            "usage_flush_interval_seconds": load_defaults()["env"]["USAGE_FLUSH_INTERVAL_SECONDS"],
            "gateway_workers": 1,
            "cpus": os.cpu_count(),
        },
        "timeline_seconds": {
            k: None if v is None else round(v, 2) for k, v in asdict(timeline).items()
        },
        "requests": {
            "sent": len(outs),
            "skipped_at_concurrency_limit": load.skipped,
            "plain": sum(1 for o in outs if o.kind == "plain"),
            "stream": sum(1 for o in outs if o.kind == "stream"),
            "abandoned": len(abandoned),
            "abandoned_after_usage": sum(1 for o in abandoned if o.usage_seen),
        },
        "phases": phases,
        "latency_overall": {
            "p50_ms": _ms(_pct(all_lat, 0.5)),
            "p99_ms": _ms(_pct(all_lat, 0.99)),
            "max_ms": _ms(max(all_lat) if all_lat else None),
        },
        "latency_per_minute": per_minute,
        "rss_mib": rss_mib,
        "rss_summary": {
            "first_mib": rss_mib[0][1] if rss_mib else None,
            "min_after_60s_mib": min(steady) if steady else None,
            "max_after_60s_mib": max(steady) if steady else None,
            "last_mib": rss_mib[-1][1] if rss_mib else None,
        },
        "charges": charges,
    }


def render(r: dict[str, Any]) -> str:
    s, req, ch = r["settings"], r["requests"], r["charges"]
    tl = r["timeline_seconds"]
    lines = [
        f"Gateway soak, {r['started_at']}: {s['minutes']} min at {s['rate_per_second']:g} req/s, "
        f"1 gateway worker, {s['cpus']} CPUs, {s['organizations']} organizations",
        f"Mix: {s['mix']}; streams {s['stream_chunks']} chunks "
        f"{s['chunk_interval_seconds']} s apart",
        f"PostgreSQL crashed (pg_ctl stop -m immediate) at {tl['crash_at']} s, "
        f"down at {tl['down_at']} s, back at {tl['up_at']} s "
        f'("during" = crash .. back + {RECOVERY_GRACE_SECONDS:g} s)',
        "",
        f"Requests: {req['sent']} sent ({req['plain']} plain, {req['stream']} streams, "
        f"{req['abandoned']} abandoned), {req['skipped_at_concurrency_limit']} skipped at the "
        "client's concurrency limit",
        "",
        "Errors by phase:",
        f"  {'phase':<8} {'requests':>9} {'non-2xx':>8} {'exceptions':>10} {'error rate':>11}",
    ]
    for name, p in r["phases"].items():
        rate = "-" if p["error_rate"] is None else f"{p['error_rate'] * 100:.3f}%"
        lines.append(
            f"  {name:<8} {p['requests']:>9} {p['non_2xx']:>8} {p['exceptions']:>10} {rate:>11}"
        )
        bad = {k: v for k, v in p["statuses"].items() if k != "200"}
        if bad or p["exception_kinds"]:
            lines.append(f"           statuses {bad} exceptions {p['exception_kinds']}")
    lo = r["latency_overall"]
    lines += [
        "",
        f"Latency (200s; streams through [DONE]): p50 {lo['p50_ms']} ms, "
        f"p99 {lo['p99_ms']} ms, max {lo['max_ms']} ms",
        f"  {'minute':>6} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'plain p50':>10} {'plain p99':>10}",
    ]
    for m in r["latency_per_minute"]:
        lines.append(
            f"  {m['minute']:>6} {m['requests']:>9} {m['p50_ms']:>8} {m['p99_ms']:>8} "
            f"{m['plain_p50_ms']:>10} {m['plain_p99_ms']:>10}"
        )
    rs = r["rss_summary"]
    lines += [
        "",
        f"Gateway RSS (MiB) every {RSS_INTERVAL_SECONDS:g} s: first {rs['first_mib']}, "
        f"after 60 s min {rs['min_after_60s_mib']} / max {rs['max_after_60s_mib']}, "
        f"last {rs['last_mib']}",
        "  " + " ".join(f"{b:g}" for _, b in r["rss_mib"]),
    ]
    lines += [
        "",
        f"Charges (upstream reports {ch['cost_per_completion_microdollars']} microdollars "
        "per completion):",
        f"  answered 200: {ch['answered_200']}; client saw the usage: {ch['client_saw_usage']}",
        f"  expected cost:            {ch['expected_cost_microdollars']}",
        f"  sum(llm_usage.cost):      {ch['llm_usage_sum_cost_microdollars']}",
        f"  sum(credits_used):        {ch['credits_used_microdollars']}",
        f"  llm_usage rows:           {ch['llm_usage_rows']} (charged {ch['charged_rows']}, "
        f"cancelled {ch['cancelled_rows']}, "
        f"cancelled and charged {ch['cancelled_and_charged_rows']})",
        f"  answered without a row: {ch['answered_without_row']}; rows without an answer: "
        f"{ch['rows_without_answer']}; rows with a wrong cost: {ch['rows_with_wrong_cost']}",
        f"  EXACT: {'yes' if ch['exact'] else 'NO'}",
    ]
    return "\n".join(lines) + "\n"


# --- Orchestration ---------------------------------------------------------------------------


async def soak(
    args: argparse.Namespace,
    pg: Postgres,
    tokens: list[str],
    database_url: str,
    gateway_url: str,
    gateway_pids: Any,
) -> dict[str, Any]:
    seconds = args.minutes * 60
    load = Load(
        gateway_url + "/api/openrouter/chat/completions",
        tokens,
        args.rate,
        seconds,
        args.concurrency,
    )
    timeline = Timeline()
    rss: list[tuple[float, int]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample_rss(gateway_pids, rss, t0, stop))
    restart = asyncio.create_task(restart_postgres(pg, seconds / 2, timeline, t0))
    await run_load(load, timeline, t0)
    await restart
    stop.set()
    await sampler
    answered = sum(1 for o in load.outcomes if o.status == 200)
    db = await read_charges(database_url, answered)
    return figures(load, timeline, rss, db, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--concurrency", type=int, default=200, help="most requests in flight")
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.started_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    pg = Postgres.create()
    try:
        pg.start_blocking()

        async def prepare() -> None:
            conn = await asyncpg.connect(pg.url())
            await conn.execute("CREATE DATABASE soak")
            await conn.close()
            conn = await asyncpg.connect(pg.url("soak"))
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(prepare())
        database_url = pg.url("soak")
        tokens = seed(database_url, args.orgs)
        up_port = free_port()
        upstream = spawn(
            "fake-upstream",
            [
                sys.executable,
                "-m",
                "bench.fake_upstream",
                "--port",
                str(up_port),
                "--chunks",
                str(STREAM_CHUNKS),
                "--interval",
                str(STREAM_INTERVAL_SECONDS),
                "--cost",
                str(COST_USD),
            ],
            log_dir=tmp,
            cwd=PROJECT_ROOT,
        )
        ready_or_stop(upstream, f"http://{HOST}:{up_port}/api/v1/models", 60)
        gw_port = free_port()
        defaults = load_defaults()["env"]
        env = {k: v for k, v in os.environ.items() if k not in defaults}
        env.pop("GATEWAY_CONFIG_FILE", None)
        env.update(
            DATABASE_URL=database_url,
            OPENROUTER_BASE_URL=f"http://{HOST}:{up_port}/api/v1",
            OPENROUTER_API_KEY=UPSTREAM_KEY,
            GATEWAY_HOST=HOST,
            GATEWAY_PORT=str(gw_port),
            AUTO_MIGRATE="false",
            LOG_LEVEL="warning",
            USAGE_SPOOL_DIR=str(tmp / "usage-spool"),
            EMBEDDED_DATA_DIR=str(tmp / "unused-embedded"),
        )
        gateway = spawn(
            "gateway",
            [sys.executable, "-m", "gateway", "serve"],
            log_dir=tmp,
            env=env,
            cwd=PROJECT_ROOT,
        )
        gateway_url = f"http://{HOST}:{gw_port}"
        ready_or_stop(gateway, gateway_url + "/healthz", 60)
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s; logs in {tmp}", flush=True)
        result = asyncio.run(soak(args, pg, tokens, database_url, gateway_url, gateway.pids))
        gateway.check_alive()
        result["gateway_stderr_tail"] = gateway.stderr_tail()[-2000:]
        spool = tmp / "usage-spool"
        result["spool_files_left"] = (
            sorted(p.name for p in spool.iterdir()) if spool.exists() else []
        )
    finally:
        stop_leftovers()
        pg.destroy()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"soak-{args.started_at}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out / "soak-latest.txt").write_text(text)
    print(text)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["charges"]["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Slow uploads with bad keys: does the gateway hold bodies it is going to refuse?

Each of ``--slow-uploads`` connections sends the head of a chat completion with
``Authorization: Bearer not-a-key`` and ``Content-Length: 10000000``, then body bytes:
``slow`` sends 64 KiB every 100 ms (a trickle), ``fast`` as fast as the socket takes
them. A gateway that judges the caller from the head answers 401 at once and closes the
connection soon after; one that buffers the body first reads all 10 MB of every
connection before it answers, and its memory grows with the connections.

Every (target, variant) gets a fresh gateway process, so its peak RSS (VmHWM, summed over
its processes) is this test's. Each connection ends when the gateway closes it, when the
body is all sent and answered on a connection kept alive, or at ``--slow-upload-seconds``.
"Sent" counts body bytes the client's kernel accepted (its send buffer is kept at 64 KiB);
up to the gateway's socket receive buffer of them may not have been read by the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from bench import client, targets
from bench.environment import Prepared, progress
from bench.load import Bodies
from bench.measure import scrape
from bench.procs import TargetFailed, cpu_seconds, open_fds, peak_rss_bytes, rss_bytes
from bench.targets import GatewayOptions, Skipped, Target, Upstream

BAD_KEY: Final = "not-a-key"
BODY_BYTES: Final = 10_000_000
CHUNK_BYTES: Final = 64 * 1024
SLOW_INTERVAL_SECONDS: Final = 0.1
SLOW, FAST = "slow", "fast"
VARIANTS: Final = (SLOW, FAST)
PATH: Final = "/api/openrouter/chat/completions"
SAMPLE_SECONDS: Final = 0.1
SETTLE_SECONDS: Final = 0.5
CONNECT_SECONDS: Final = 5.0
_CHUNK: Final = b"x" * CHUNK_BYTES


def request_head(host: str, port: int) -> bytes:
    """The head every connection sends before its body."""
    return (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {BAD_KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {BODY_BYTES}\r\n"
        "\r\n"
    ).encode()


@dataclass
class Upload:
    """One connection: what it sent, what came back and when (seconds after its head)."""

    sent: int = 0
    status: int | None = None
    status_after: float | None = None
    connection_close: bool = False  # the response said ``Connection: close``
    response_complete: bool = False
    fin_after: float | None = None  # the gateway stopped sending (FIN: closed or half-closed)
    reset_after: float | None = None  # the gateway refused more body (a reset on send/recv)
    open_at_end: bool = False  # still open when the run's time was up
    error: str | None = None  # could not connect or send the head


@dataclass
class _Connection:
    """A connection's socket, its state and the event that ends it."""

    sock: socket.socket
    upload: Upload
    started: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def elapsed(self) -> float:
        """Seconds since the head was sent."""
        return time.monotonic() - self.started

    def finished(self) -> None:
        """The gateway will send nothing more: the connection ends once the body is sent."""
        self.upload.fin_after = self.elapsed()
        if self.upload.sent >= BODY_BYTES:
            self.ended.set()

    def reset(self) -> None:
        """The gateway closed the connection with body bytes unread: it ends now."""
        if self.upload.reset_after is None:
            self.upload.reset_after = self.elapsed()
        self.ended.set()


def _parse_head(head: bytes, upload: Upload) -> int:
    """Status and ``Connection: close`` from a response head; its Content-Length."""
    lines = head.decode("latin-1").split("\r\n")
    upload.status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "connection" and "close" in value.lower():
            upload.connection_close = True
        elif name.strip().lower() == "content-length":
            length = int(value.strip())
    return length


async def _read(conn: _Connection) -> None:
    """Read the response; note the status, its end and the gateway's close."""
    loop = asyncio.get_running_loop()
    upload, pending, body_left = conn.upload, b"", None
    while True:
        try:
            data = await loop.sock_recv(conn.sock, 65536)
        except (ConnectionResetError, BrokenPipeError):
            conn.reset()
            return
        if not data:
            # A close, or a half close (the answer sent, the body still read for a while):
            # the writer goes on until the body is sent or a send fails.
            conn.finished()
            return
        if body_left is None:
            pending += data
            if b"\r\n\r\n" not in pending:
                continue
            head, _, rest = pending.partition(b"\r\n\r\n")
            upload.status_after = conn.elapsed()
            body_left = _parse_head(head, upload) - len(rest)
        else:
            body_left -= len(data)
        if body_left <= 0 and not upload.response_complete:
            upload.response_complete = True
            if upload.sent >= BODY_BYTES and not upload.connection_close:
                conn.ended.set()  # answered and kept alive: nothing more will happen


async def _write(conn: _Connection, variant: str) -> None:
    """Send the body: a chunk every 100 ms (slow) or as fast as it goes (fast)."""
    loop = asyncio.get_running_loop()
    upload, chunks = conn.upload, 0
    while upload.sent < BODY_BYTES:
        if variant == SLOW:
            due = conn.started + chunks * SLOW_INTERVAL_SECONDS
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        chunk = _CHUNK[: BODY_BYTES - upload.sent]
        try:
            await loop.sock_sendall(conn.sock, chunk)
        except (ConnectionResetError, BrokenPipeError):
            conn.reset()
            return
        upload.sent += len(chunk)
        chunks += 1
    if upload.fin_after is not None or (upload.response_complete and not upload.connection_close):
        conn.ended.set()


async def _upload(host: str, port: int, variant: str, deadline: float) -> Upload:
    """One connection, from its head to its end."""
    loop = asyncio.get_running_loop()
    upload = Upload()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    # A small send buffer, so "sent" is close to what reached the gateway's socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK_BYTES)
    try:
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, request_head(host, port))
        except (OSError, TimeoutError) as exc:
            upload.error = type(exc).__name__
            return upload
        conn = _Connection(sock, upload, time.monotonic())
        tasks = [asyncio.create_task(_read(conn)), asyncio.create_task(_write(conn, variant))]
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await conn.ended.wait()
        except TimeoutError:
            upload.open_at_end = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        sock.close()
    return upload


async def upload_all(
    host: str, port: int, connections: int, variant: str, seconds: float
) -> list[Upload]:
    """``connections`` uploads at once, each ending by ``seconds`` from now."""
    deadline = time.monotonic() + seconds
    return list(
        await asyncio.gather(*(_upload(host, port, variant, deadline) for _ in range(connections)))
    )


class _Sampler:
    """RSS of a target every 100 ms on a thread: the peak seen and a coarse time series."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self.started = time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.started, rss_bytes(self._pids())))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def series(self, every_seconds: float = 0.5) -> list[list[float]]:
        """``[seconds, MiB]`` pairs, one per ``every_seconds``."""
        kept: list[list[float]] = []
        for at, rss in self.samples:
            if not kept or at - kept[-1][0] >= every_seconds:
                kept.append([round(at, 2), round(rss / 2**20, 1)])
        return kept


def _spread(values: list[float], digits: int) -> dict[str, float | None]:
    """Median, minimum and maximum, rounded; None when there are no values."""
    if not values:
        return {"p50": None, "min": None, "max": None}
    return {
        "p50": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summarize(uploads: list[Upload]) -> dict[str, Any]:
    """The connections' outcomes, counted and spread."""
    statuses = Counter(str(u.status) for u in uploads if u.status is not None)
    refused = [u for u in uploads if u.status == 401]
    fins = [u.fin_after for u in uploads if u.fin_after is not None]
    resets = [u.reset_after for u in uploads if u.reset_after is not None]
    closed = [u for u in uploads if u.fin_after is not None or u.reset_after is not None]
    return {
        "statuses": dict(statuses),
        "answered_401": len(refused),
        "no_answer": sum(1 for u in uploads if u.status is None and u.error is None),
        "answer_401_ms": _spread(
            [u.status_after * 1e3 for u in refused if u.status_after is not None], 1
        ),
        # FIN or reset: the gateway ended (or began to end) the connection.
        "closed_by_gateway": len(closed),
        "closed_before_body_sent": sum(1 for u in closed if u.sent < BODY_BYTES),
        "fin": len(fins),
        "fin_after_s": _spread(fins, 3),
        "reset": len(resets),
        "reset_after_s": _spread(resets, 3),
        "open_at_end": sum(1 for u in uploads if u.open_at_end),
        "body_sent_all": sum(1 for u in uploads if u.sent >= BODY_BYTES),
        "sent_bytes": _spread([float(u.sent) for u in uploads if u.error is None], 0),
        "sent_bytes_total": sum(u.sent for u in uploads),
        "errors": dict(Counter(u.error for u in uploads if u.error)),
    }


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """How many connections, how long at most, and which gateways."""

    connections: int
    seconds: float
    workers: int
    wanted: tuple[str, ...] = (targets.GATEWAY,)
    baseline_tree: Path | None = None
    variants: tuple[str, ...] = VARIANTS


def measure(
    target: Target, plan: UploadPlan, variant: str, token: str, bodies: Bodies
) -> dict[str, Any]:
    """The uploads through a fresh ``target``: its memory, CPU and every outcome."""
    tokens: client.TokenSource = lambda: token  # noqa: E731
    client.run_async(client.sequential(target.chat_url, tokens, bodies.small, 0.2, 0))
    pids = target.child.pids()
    before = {"rss_bytes": rss_bytes(pids), "open_fds": open_fds(pids)}
    cpu_before = cpu_seconds(pids)
    url = urlsplit(target.chat_url)
    host, port = url.hostname or targets.HOST, url.port or 80
    started = time.monotonic()
    with _Sampler(target.child.pids) as sampler:
        uploads = client.run_async(upload_all(host, port, plan.connections, variant, plan.seconds))
    seconds = time.monotonic() - started
    pids = target.child.pids()
    peak = peak_rss_bytes(pids)
    cpu = cpu_seconds(pids) - cpu_before
    time.sleep(SETTLE_SECONDS)
    pids = target.child.pids()
    after = {"rss_bytes": rss_bytes(pids), "open_fds": open_fds(pids)}
    logged: dict[str, int] = {}
    if target.metrics_url:
        with contextlib.suppress(OSError):
            logged = dict(scrape(target.metrics_url).statuses)
    return {
        "target": target.name,
        "variant": variant,
        "connections": plan.connections,
        "body_bytes": BODY_BYTES,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "peak_sampled_rss_bytes": max((r for _, r in sampler.samples), default=0),
        "rss_mib_series": sampler.series(),
        "cpu_seconds": round(cpu, 3),
        "before": before,
        "after": after,
        "gateway_statuses": logged,
        **({"baseline": target.info} if target.info else {}),
        **summarize(uploads),
    }


def slow_uploads_phase(
    plan: UploadPlan, prep: Prepared, tmp: Path, log_dir: Path, bodies: Bodies
) -> list[dict[str, Any]]:
    """Every wanted gateway, every variant, each on a fresh process."""
    results: list[dict[str, Any]] = []
    if prep.database_url is None:
        return results
    for name in plan.wanted:
        for variant in plan.variants:
            progress(f"    {name} {variant}: {plan.connections} uploads with a bad key")
            try:
                outcome = _start(
                    name, variant, plan, prep.upstream, prep.database_url, tmp, log_dir
                )
            except TargetFailed as exc:
                results.append({"target": name, "variant": variant, "failed": str(exc)})
                continue
            if isinstance(outcome, Skipped):
                results.append({"target": name, "variant": variant, "failed": outcome.reason})
                continue
            try:
                outcome.name = name
                results.append(measure(outcome, plan, variant, prep.token, bodies))
            finally:
                outcome.child.stop()
    return results


def _start(
    name: str,
    variant: str,
    plan: UploadPlan,
    upstream: Upstream,
    database_url: str,
    tmp: Path,
    log_dir: Path,
) -> Target | Skipped:
    """A fresh gateway (or gateway-baseline) process for one variant."""
    label = f"slow-uploads-{name}-{variant}"
    if name == targets.GATEWAY_BASELINE:
        options = GatewayOptions(label, plan.workers, tree=plan.baseline_tree)
        return targets.start_gateway_baseline(options, upstream, database_url, tmp, log_dir)
    return targets.start_gateway(
        GatewayOptions(label, plan.workers), upstream, database_url, tmp, log_dir
    )

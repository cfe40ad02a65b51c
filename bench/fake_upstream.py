"""A real aiohttp server that answers like OpenRouter's API (``https://openrouter.ai/api/v1``).

Shared by the test suite (via :func:`start_upstream`) and the benchmark harness
(``python -m bench.fake_upstream``). Every route is served both under ``/api/v1`` and at
the root, so a proxy's upstream base URL can be either ``http://host:port/api/v1`` or
``http://host:port``.

Behaviour is driven by a mutable :class:`UpstreamSettings`; what the server received is
kept by a :class:`Recorder` stored in the app under :data:`RECORDER`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import http
import json
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

__all__ = [
    "API_PREFIX",
    "MID_STREAM_ERROR_MODEL",
    "RECORDER",
    "SETTINGS",
    "RecordedRequest",
    "Recorder",
    "RunningUpstream",
    "UpstreamSettings",
    "create_upstream_app",
    "main",
    "start_upstream",
]

API_PREFIX: Final = "/api/v1"
# Requests naming this model get an in-band SSE error after the first content chunk.
MID_STREAM_ERROR_MODEL: Final = "fake/mid-stream-error"
# OpenRouter routes requests without a model to the account default; "auto" stands in.
DEFAULT_MODEL: Final = "openrouter/auto"
KEEPALIVE_COMMENT: Final = b": OPENROUTER PROCESSING\n\n"
DONE_FRAME: Final = b"data: [DONE]\n\n"

_PROVIDER: Final = "FakeProvider"
# Arbitrary client-chosen model names must not grow the response caches without bound.
_CACHE_LIMIT: Final = 256
_POLL_INTERVAL: Final = 0.005
# Chat requests with long histories exceed aiohttp's 1 MiB default body limit.
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
# Benchmarks open many connections at once; the default listen backlog (128) drops SYNs.
_BACKLOG: Final = 1024

_V = TypeVar("_V")


@dataclass
class UpstreamSettings:
    """How the fake upstream answers; mutable so tests can change behaviour between requests."""

    delay_seconds: float = 0.0
    chunk_count: int = 3
    chunk_interval_seconds: float = 0.0
    cost_usd: float = 0.00042
    prompt_tokens: int = 11
    completion_tokens: int = 7
    keepalive_comment: bool = True
    fail_status: int | None = None
    die_after_chunks: int | None = None
    send_usage: bool = True


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request exactly as the fake upstream received it."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


class _Outcome(enum.Enum):
    """How a handler ended, as far as the recorder is concerned."""

    COMPLETED = enum.auto()
    CANCELLED = enum.auto()
    ABORTED = enum.auto()


class Recorder:
    """Remembers requests and counts handler outcomes so tests can assert on them."""

    def __init__(self, *, keep_requests: bool = True) -> None:
        """Start with empty counters; ``keep_requests=False`` keeps memory flat in benchmarks."""
        self.keep_requests = keep_requests
        self.requests: list[RecordedRequest] = []
        self.received = 0
        self.in_flight = 0
        self.completed = 0
        self.cancelled = 0
        self.aborted = 0

    def reset(self) -> None:
        """Forget recorded requests and zero the finished counters (in_flight is live state)."""
        self.requests.clear()
        self.received = self.completed = self.cancelled = self.aborted = 0

    @property
    def last(self) -> RecordedRequest:
        """The most recently received request."""
        if not self.requests:
            raise LookupError("fake upstream has not recorded any request")
        return self.requests[-1]

    def record(self, request: RecordedRequest) -> None:
        """Note a request that reached the server."""
        self.received += 1
        if self.keep_requests:
            self.requests.append(request)

    def finish(self, outcome: _Outcome) -> None:
        """Count how a handler ended."""
        if outcome is _Outcome.COMPLETED:
            self.completed += 1
        elif outcome is _Outcome.CANCELLED:
            self.cancelled += 1
        else:
            self.aborted += 1

    async def wait_for(
        self,
        predicate: Callable[[Recorder], bool],
        # An explicit timeout reads better in tests than wrapping every call in a scope.
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Poll until ``predicate(self)`` holds, raising ``TimeoutError`` at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Polling (rather than an Event per counter) lets callers test any combination of state.
        while not predicate(self):
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"fake upstream condition not met within {timeout}s; recorder state: {self!r}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    def __repr__(self) -> str:
        """Summarise counters for assertion and timeout messages."""
        return (
            f"Recorder(received={self.received}, in_flight={self.in_flight}, "
            f"completed={self.completed}, cancelled={self.cancelled}, aborted={self.aborted})"
        )


class _Kind(enum.Enum):
    """Which OpenAI-style endpoint shape to produce."""

    CHAT = "chat"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class _StreamFrames:
    """Pre-encoded SSE frames for one (model, settings) combination."""

    content: tuple[bytes, ...]
    tail: bytes
    error: bytes


@dataclass
class _ResponseCache:
    """Per-app caches so the hot path does not re-serialise identical JSON."""

    bodies: dict[tuple[object, ...], bytes]
    frames: dict[tuple[object, ...], _StreamFrames]


SETTINGS: Final = web.AppKey("fake_upstream_settings", UpstreamSettings)
RECORDER: Final = web.AppKey("fake_upstream_recorder", Recorder)
_CACHE: Final = web.AppKey("fake_upstream_cache", _ResponseCache)
_OUTCOME: Final = web.RequestKey("fake_upstream_outcome", _Outcome)


def _dumps(obj: object) -> bytes:
    """Serialise compactly, as OpenRouter does."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: object) -> bytes:
    """Encode one SSE data event."""
    return b"data: " + _dumps(obj) + b"\n\n"


def _generation_id() -> str:
    """Make an id shaped like OpenRouter's ``gen-<unix>-<random>``."""
    return f"gen-{int(time.time())}-{secrets.token_hex(10)}"


def _usage(settings: UpstreamSettings) -> dict[str, Any]:
    """Build the usage object OpenRouter attaches, including the billed cost."""
    return {
        "prompt_tokens": settings.prompt_tokens,
        "completion_tokens": settings.completion_tokens,
        "total_tokens": settings.prompt_tokens + settings.completion_tokens,
        "cost": settings.cost_usd,
        "is_byok": False,
    }


def _token(index: int) -> str:
    """Content of the index-th streamed chunk."""
    return f"tok{index} "


def _stream_choice(kind: _Kind, text: str, finish_reason: str | None) -> dict[str, Any]:
    """One streamed choice in the endpoint's shape."""
    choice: dict[str, Any] = {"index": 0}
    if kind is _Kind.CHAT:
        choice["delta"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(finish_reason=finish_reason, native_finish_reason=finish_reason, logprobs=None)
    return choice


def _envelope(kind: _Kind, gen_id: str, model: str, created: int, stream: bool) -> dict[str, Any]:
    """Fields shared by every completion object and chunk."""
    if kind is _Kind.CHAT:
        obj = "chat.completion.chunk" if stream else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": gen_id, "provider": _PROVIDER, "model": model, "object": obj, "created": created}


def _build_body(kind: _Kind, model: str, settings: UpstreamSettings) -> bytes:
    """Encode a complete non-streaming response."""
    text = "".join(_token(i) for i in range(settings.chunk_count))
    choice: dict[str, Any] = {"index": 0, "logprobs": None}
    if kind is _Kind.CHAT:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    choice.update(finish_reason="stop", native_finish_reason="stop")
    body = _envelope(kind, _generation_id(), model, int(time.time()), stream=False)
    body["choices"] = [choice]
    if settings.send_usage:
        body["usage"] = _usage(settings)
    return _dumps(body)


def _build_frames(kind: _Kind, model: str, settings: UpstreamSettings) -> _StreamFrames:
    """Encode every SSE frame a streaming response can need."""
    base = _envelope(kind, _generation_id(), model, int(time.time()), stream=True)
    content = tuple(
        _sse({**base, "choices": [_stream_choice(kind, _token(i), None)]})
        for i in range(settings.chunk_count)
    )
    # Like OpenRouter: finish_reason arrives in its own chunk, usage in a later one.
    tail = _sse({**base, "choices": [_stream_choice(kind, "", "stop")]})
    if settings.send_usage:
        tail += _sse({**base, "choices": [], "usage": _usage(settings)})
    error = _sse(
        {
            **base,
            "error": {"code": 502, "message": "Provider disconnected"},
            "choices": [_stream_choice(kind, "", "error")],
        }
    )
    return _StreamFrames(content=content, tail=tail + DONE_FRAME, error=error)


def _cache_key(kind: _Kind, model: str, settings: UpstreamSettings) -> tuple[object, ...]:
    """Everything that changes the encoded bytes, read fresh since settings are mutable."""
    return (
        kind,
        model,
        settings.chunk_count,
        settings.prompt_tokens,
        settings.completion_tokens,
        settings.cost_usd,
        settings.send_usage,
    )


def _cached(
    cache: dict[tuple[object, ...], _V], key: tuple[object, ...], build: Callable[[], _V]
) -> _V:
    """Return the cached value for key, building (and bounding the cache) on a miss."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        value = cache[key] = build()
    return value


def _error_response(status: int, message: str | None = None) -> web.Response:
    """An OpenRouter-style JSON error body."""
    if message is None:
        try:
            message = http.HTTPStatus(status).phrase
        except ValueError:
            message = "Upstream error"
    body = _dumps({"error": {"code": status, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


async def _read_json_object(request: web.Request) -> dict[str, Any] | None:
    """Parse the request body as a JSON object, or None if it is not one."""
    try:
        payload = json.loads(await request.read())
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-body to simulate an upstream crash."""
    request[_OUTCOME] = _Outcome.ABORTED
    transport = request.transport
    if transport is not None:
        # close() rather than abort(): already-written chunks are flushed first, so the client
        # deterministically sees exactly die_after_chunks chunks, then a truncated body.
        transport.close()
    # aiohttp's write_eof on the closed transport fails and is treated as a client disconnect.
    return response


async def _stream(
    request: web.Request,
    settings: UpstreamSettings,
    frames: _StreamFrames,
    mid_stream_error: bool,
) -> web.StreamResponse:
    """Send an SSE completion stream, one write (and drain) per chunk."""
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    die_after = settings.die_after_chunks
    interval = settings.chunk_interval_seconds
    try:
        if settings.keepalive_comment:
            await response.write(KEEPALIVE_COMMENT)
        for index, frame in enumerate(frames.content):
            if die_after is not None and index >= die_after:
                return _abort(request, response)
            if index and interval > 0:
                await asyncio.sleep(interval)
            await response.write(frame)
            if mid_stream_error:
                break
        if mid_stream_error:
            # OpenRouter reports provider failures in-band once streaming has begun, no [DONE].
            await response.write(frames.error)
        elif die_after is not None:
            # die_after_chunks >= chunk_count: crash before finish_reason/usage/[DONE].
            return _abort(request, response)
        else:
            # One write for finish, usage and [DONE] exercises clients parsing several
            # events per read; the content chunks already cover one event per read.
            await response.write(frames.tail)
        await response.write_eof()
    except ConnectionResetError:
        # Covers aiohttp.ClientConnectionResetError ("Cannot write to closing transport").
        request[_OUTCOME] = _Outcome.CANCELLED
    return response


async def _completion(request: web.Request, kind: _Kind) -> web.StreamResponse:
    """Answer a chat or text completion request, streaming if asked to."""
    payload = await _read_json_object(request)
    if payload is None:
        return _error_response(400, "Request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        model = DEFAULT_MODEL
    settings = request.app[SETTINGS]
    cache = request.app[_CACHE]
    key = _cache_key(kind, model, settings)
    if payload.get("stream") is True:
        frames = _cached(cache.frames, key, lambda: _build_frames(kind, model, settings))
        return await _stream(request, settings, frames, model == MID_STREAM_ERROR_MODEL)
    body = _cached(cache.bodies, key, lambda: _build_body(kind, model, settings))
    return web.Response(body=body, content_type="application/json")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /chat/completions."""
    return await _completion(request, _Kind.CHAT)


async def _text_completions(request: web.Request) -> web.StreamResponse:
    """POST /completions."""
    return await _completion(request, _Kind.TEXT)


def _model_entry(
    model_id: str, name: str, prompt_price: str, completion_price: str
) -> dict[str, Any]:
    """One entry of the /models listing, in OpenRouter's shape."""
    return {
        "id": model_id,
        "canonical_slug": model_id.removesuffix(":free"),
        "name": name,
        "created": 1_700_000_000,
        "description": f"{name} (fake upstream)",
        "context_length": 131072,
        "architecture": {
            "modality": "text->text",
            "input_modalities": ["text"],
            "output_modalities": ["text"],
            "tokenizer": "Other",
            "instruct_type": None,
        },
        "pricing": {
            "prompt": prompt_price,
            "completion": completion_price,
            "request": "0",
            "image": "0",
        },
        "top_provider": {
            "context_length": 131072,
            "max_completion_tokens": 16384,
            "is_moderated": False,
        },
        "per_request_limits": None,
        "supported_parameters": ["max_tokens", "temperature", "stream", "tools"],
    }


_MODELS_BODY: Final = _dumps(
    {
        "data": [
            _model_entry("openai/gpt-4o-mini", "OpenAI: GPT-4o-mini", "0.00000015", "0.0000006"),
            _model_entry(
                "anthropic/claude-3.5-sonnet",
                "Anthropic: Claude 3.5 Sonnet",
                "0.000003",
                "0.000015",
            ),
            _model_entry(
                "meta-llama/llama-3.3-70b-instruct:free", "Meta: Llama 3.3 70B (free)", "0", "0"
            ),
        ]
    }
)


async def _models(request: web.Request) -> web.Response:
    """GET /models."""
    return web.Response(body=_MODELS_BODY, content_type="application/json")


async def _echo(request: web.Request) -> web.Response:
    """Describe the request back, so tests can assert on what a proxy forwarded."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), []).append(value)
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query_string": request.rel_url.raw_query_string,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
        }
    )


@web.middleware
async def _upstream_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request, apply delay/failure settings and count how the handler ended."""
    recorder = request.app[RECORDER]
    settings = request.app[SETTINGS]
    recorder.in_flight += 1
    try:
        body = await request.read()
        recorder.record(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query_string=request.rel_url.raw_query_string,
                headers=CIMultiDict(request.headers),
                body=body,
            )
        )
        if settings.delay_seconds > 0:
            await asyncio.sleep(settings.delay_seconds)
        if settings.fail_status is not None and request.method == "POST":
            response: web.StreamResponse = _error_response(settings.fail_status)
        else:
            response = await handler(request)
    except asyncio.CancelledError:
        # handler_cancellation=True turns a client disconnect into this cancellation.
        recorder.finish(_Outcome.CANCELLED)
        raise
    finally:
        recorder.in_flight -= 1
    recorder.finish(request.get(_OUTCOME, _Outcome.COMPLETED))
    return response


def create_upstream_app(settings: UpstreamSettings | None = None) -> web.Application:
    """Build the fake OpenRouter application (no I/O)."""
    app = web.Application(middlewares=[_upstream_middleware], client_max_size=_CLIENT_MAX_SIZE)
    app[SETTINGS] = settings if settings is not None else UpstreamSettings()
    app[RECORDER] = Recorder()
    app[_CACHE] = _ResponseCache(bodies={}, frames={})
    for prefix in (API_PREFIX, ""):
        app.router.add_post(f"{prefix}/chat/completions", _chat_completions)
        app.router.add_post(f"{prefix}/completions", _text_completions)
        app.router.add_get(f"{prefix}/models", _models)
    # Registered last: the router falls through to it for any path/method not matched above.
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def _format_host(host: str) -> str:
    """Bracket IPv6 literals for use in a URL."""
    return f"[{host}]" if ":" in host else host


@dataclass
class RunningUpstream:
    """A started fake upstream; close it (or use ``async with``) when done."""

    runner: web.AppRunner
    settings: UpstreamSettings
    recorder: Recorder
    host: str
    port: int

    @property
    def root_url(self) -> str:
        """Base URL without the API prefix, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{_format_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """OpenRouter-style base URL, e.g. ``http://127.0.0.1:PORT/api/v1``."""
        return self.root_url + API_PREFIX

    async def close(self) -> None:
        """Stop listening and shut down open connections."""
        await self.runner.cleanup()

    async def __aenter__(self) -> Self:
        """Return self; the server is already running."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the server."""
        await self.close()


async def start_upstream(
    settings: UpstreamSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> RunningUpstream:
    """Start the fake upstream on host:port (0 picks a free port)."""
    app = create_upstream_app(settings)
    # A short shutdown_timeout keeps test teardown fast when slow streams are still open.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=_BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return RunningUpstream(
        runner=runner, settings=app[SETTINGS], recorder=app[RECORDER], host=host, port=bound_port
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the standalone server's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake_upstream", description="Fake OpenRouter upstream server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before first byte")
    parser.add_argument("--chunks", type=int, default=3, help="content chunks per stream")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--cost", type=float, default=UpstreamSettings.cost_usd)
    parser.add_argument(
        "--record", action="store_true", help="keep every request in memory (off for benchmarks)"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    """Run until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    # Benchmark harnesses stop the server with SIGTERM; close sockets cleanly instead of dying.
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settings = UpstreamSettings(
        delay_seconds=args.delay,
        chunk_count=args.chunks,
        chunk_interval_seconds=args.interval,
        cost_usd=args.cost,
    )
    async with await start_upstream(settings, args.host, args.port) as upstream:
        upstream.recorder.keep_requests = args.record
        print(f"fake upstream listening on {upstream.url}", flush=True)
        await stop.wait()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Prefer uvloop so the fake upstream is never the benchmark bottleneck."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for ``python -m bench.fake_upstream``."""
    args = _parse_args(argv)
    # Ctrl-C is the normal way to stop the standalone server; exit quietly.
    with (
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
        contextlib.suppress(KeyboardInterrupt),
    ):
        runner.run(_serve(args))


if __name__ == "__main__":
    main()

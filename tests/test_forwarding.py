"""The proxy's pure helpers: which path goes upstream, which headers cross each way, and
which route label a request is counted under. No sockets; headers are plain multidicts.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import BadRequest
from gateway.proxy.forwarding import (
    KNOWN_PATHS,
    PREFIX,
    forward_headers,
    metric_route,
    relay_headers,
    upstream_path,
    upstream_target,
)
from gateway.proxy.upstream import Origin

BASE_URL = "https://openrouter.ai/api/v1"
UPSTREAM_KEY = "sk-or-v1-gateway-upstream-key"
REQUEST_ID = "req-0123456789abcdef"
# Deterministic, and writes no example database into the working tree.
PROPERTY = settings(
    database=None, derandomize=True, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)

# Pieces that path tricks are made of, and harmless ones to put between them.
PATH_PIECES = [
    *(".", "..", "%2e", "%2E", "%2e%2e", "/", "//", "v1/", "%2f", "%5c", "\\", "%00"),
    *("a", "chat", "completions", "%25", "%", "2e", "e", "@", ":", ";", "~", " "),
]

# Any text at all, with path-trick pieces (and ? and #) mixed in so the search reaches them.
ARBITRARY_TAILS = st.lists(
    st.one_of(st.text(), st.sampled_from([*PATH_PIECES, "?", "#"])), max_size=8
).map("".join)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request or response headers as aiohttp hands them over."""
    return CIMultiDictProxy(CIMultiDict(pairs))


def assert_invalid_path(raw_path: str) -> None:
    """upstream_path refuses `raw_path` with a 400 invalid_path."""
    with pytest.raises(BadRequest) as info:
        upstream_path(raw_path)
    assert info.value.status == 400
    assert info.value.reason == "invalid_path"


def dot_segments(url_path: str) -> list[str]:
    """The `.` and `..` segments of a path once percent-decoded."""
    return [s for s in unquote(url_path).split("/") if s in (".", "..")]


class TestUpstreamPath:
    """Which request paths map to which upstream paths, and which are refused."""

    @pytest.mark.parametrize(
        ("raw_path", "expected"),
        [
            ("/api/openrouter/chat/completions", "chat/completions"),
            ("/api/openrouter/completions", "completions"),
            ("/api/openrouter/models", "models"),
            ("/api/openrouter/embeddings", "embeddings"),
            ("/api/openrouter/generation", "generation"),
            ("/api/openrouter/v1/chat/completions", "chat/completions"),
            ("/api/openrouter/v1/models", "models"),
            ("/api/openrouter/v1/v1/models", "v1/models"),
            ("/api/openrouter/v1", "v1"),
            ("/api/openrouter/v2/models", "v2/models"),
            ("/api/openrouter/models/openai/gpt-4o", "models/openai/gpt-4o"),
            ("/api/openrouter/models/a%20b", "models/a%20b"),
            ("/api/openrouter/models/%2e%2ex", "models/%2e%2ex"),
            ("/api/openrouter/models/...", "models/..."),
            ("/api/openrouter/models/.hidden", "models/.hidden"),
            ("/api/openrouter/models/a..b", "models/a..b"),
            ("/api/openrouter/models/%252e%252e", "models/%252e%252e"),
            ("/api/openrouter/models/caf%C3%A9", "models/caf%C3%A9"),
        ],
    )
    def test_maps_path(self, raw_path: str, expected: str):
        """The prefix and one leading v1/ are dropped; the rest is kept still encoded."""
        assert upstream_path(raw_path) == expected

    @pytest.mark.parametrize(
        "tail",
        [
            # dot segments, literal and percent-encoded in any case
            "..",
            ".",
            "../admin",
            "./chat/completions",
            "chat/../admin",
            "chat/./completions",
            "chat/completions/..",
            "chat/completions/.",
            "v1/../admin",
            "v1/..",
            "%2e%2e",
            "%2E%2E",
            "%2E%2e",
            "%2e%2E/admin",
            "chat/%2e%2e/admin",
            "%2e",
            "%2E",
            ".%2e",
            "%2e.",
            ".%2E/admin",
            "%2E./admin",
            # empty segments
            "",
            "/",
            "//",
            "chat//completions",
            "/chat/completions",
            "chat/completions/",
            "v1/",
            "v1//models",
            # encoded slashes and backslashes, NUL
            "chat%2fcompletions",
            "chat%2Fcompletions",
            "..%2fadmin",
            "%2e%2e%2Fadmin",
            "chat%5ccompletions",
            "chat%5Ccompletions",
            "chat\\completions",
            "..\\admin",
            "\\",
            "chat%00",
            "chat/completions%00.json",
        ],
    )
    def test_refuses_path_tricks(self, tail: str):
        """Dot segments, empty segments, encoded slashes, backslashes and NULs are a 400."""
        assert_invalid_path(PREFIX + tail)

    @pytest.mark.parametrize(
        "raw_path",
        [
            "/",
            "",
            "/api/openrouter",
            "/api/openrouterx/chat/completions",
            "/api/openrouter-evil/chat/completions",
            "/API/OPENROUTER/chat/completions",
            "/api/openai/chat/completions",
            "/v1/chat/completions",
            "/chat/completions",
            "api/openrouter/chat/completions",
            "//api/openrouter/chat/completions",
            "/api//openrouter/chat/completions",
            "/x/api/openrouter/chat/completions",
            "/api/%6Fpenrouter/chat/completions",
        ],
    )
    def test_refuses_paths_outside_prefix(self, raw_path: str):
        """A path not under /api/openrouter/ is a 400 invalid_path."""
        assert_invalid_path(raw_path)

    @pytest.mark.parametrize(
        "tail",
        ["..?x", "chat/%2E%2E?stream=true", "..#x", "chat/.#x"],
    )
    def test_refuses_dot_segment_before_query_or_fragment(self, tail: str):
        """A dot segment ended by `?` or `#` is still a dot segment once parsed as a URL."""
        assert_invalid_path(PREFIX + tail)


class TestUpstreamPathProperty:
    """Whatever the path, what goes upstream stays under the base URL's /api/v1/."""

    def _assert_stays_under_base(self, tail: str) -> None:
        try:
            result = upstream_path(PREFIX + tail)
        except BadRequest as exc:
            assert exc.reason == "invalid_path"
            return
        url = upstream_url(BASE_URL, result, "")
        assert url.host == "openrouter.ai"
        assert url.raw_path.startswith("/api/v1/")
        assert url.path.startswith("/api/v1/")
        assert dot_segments(url.raw_path) == []
        assert [s for s in url.path.split("/") if s in (".", "..")] == []  # yarl's decoding

    @PROPERTY
    @given(ARBITRARY_TAILS)
    @example("..?x")
    @example("chat/%2e%2e#x")
    def test_arbitrary_text_stays_under_base(self, tail: str):
        """For any text tail: a 400, or an upstream URL on openrouter.ai under /api/v1/."""
        self._assert_stays_under_base(tail)

    @PROPERTY
    @given(
        st.lists(
            st.sampled_from(PATH_PIECES),
            max_size=12,
        ).map("".join)
    )
    def test_path_shaped_text_stays_under_base(self, tail: str):
        """Tails built from dots, slashes and escapes (no ? or #) never climb out of /api/v1/."""
        self._assert_stays_under_base(tail)

    @PROPERTY
    @given(st.text().filter(lambda t: "?" not in t and "#" not in t))
    def test_text_without_query_or_fragment_stays_under_base(self, tail: str):
        """For any tail aiohttp could deliver (a raw path has no ? or #), the property holds."""
        self._assert_stays_under_base(tail)


def upstream_url(base_url: str, tail: str, query: str) -> URL:
    """The URL the upstream client requests: its origin plus the request target."""
    origin = Origin.parse(base_url)
    target = upstream_target(origin.base_path, tail, query)
    return URL(f"{origin.scheme}://{origin.host_header}{target}", encoded=True)


class TestUpstreamUrl:
    """How the upstream URL is put together."""

    @pytest.mark.parametrize(
        ("tail", "query", "expected"),
        [
            ("chat/completions", "", f"{BASE_URL}/chat/completions"),
            (
                "models",
                "supported_parameters=tools",
                f"{BASE_URL}/models?supported_parameters=tools",
            ),
            ("generation", "id=gen-123%2B456", f"{BASE_URL}/generation?id=gen-123%2B456"),
            ("models", "a=%20b&c=d%2Fe+f&flag", f"{BASE_URL}/models?a=%20b&c=d%2Fe+f&flag"),
            ("models", "q=caf%C3%A9&x=%25", f"{BASE_URL}/models?q=caf%C3%A9&x=%25"),
            ("models", "a=1&a=2&b=", f"{BASE_URL}/models?a=1&a=2&b="),
            ("models/a%20b", "", f"{BASE_URL}/models/a%20b"),
            ("models/openai%3Agpt", "", f"{BASE_URL}/models/openai%3Agpt"),
            ("models/%252e", "", f"{BASE_URL}/models/%252e"),
        ],
    )
    def test_verbatim(self, tail: str, query: str, expected: str):
        """Path and query reach the upstream exactly as the client encoded them."""
        url = upstream_url(BASE_URL, tail, query)
        assert str(url) == expected
        assert url.raw_path == "/api/v1/" + tail
        assert url.raw_query_string == query

    def test_no_query_means_no_question_mark(self):
        """An empty query string adds no trailing `?`."""
        assert "?" not in str(upstream_url(BASE_URL, "models", ""))

    def test_other_base(self):
        """The base URL (a local fake upstream) is used as given."""
        url = upstream_url("http://127.0.0.1:9999/api/v1", "chat/completions", "")
        assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9999)
        assert url.raw_path == "/api/v1/chat/completions"


class TestForwardHeaders:
    """What the upstream sees of the client's headers."""

    @pytest.mark.parametrize(
        "name",
        [
            "Authorization",
            "authorization",
            "Cookie",
            "COOKIE",
            "Host",
            "Content-Length",
            "content-length",
            "Expect",
            "Connection",
            "Keep-Alive",
            "keep-alive",
            "TE",
            "te",
            "Trailer",
            "Transfer-Encoding",
            "transfer-encoding",
            "Upgrade",
            "Proxy-Authorization",
            "proxy-authorization",
            "Proxy-Connection",
            "X-KiloCode-OrganizationId",
            "x-kilocode-organizationid",
            "X-KILOCODE-TASKID",
            "X-Kilocode-Version",
            "x-KiloCode-Anything-Else",
        ],
    )
    def test_drops(self, name: str):
        """Credentials, hop-by-hop, framing and X-KiloCode-* headers never go upstream."""
        out = forward_headers(headers((name, "value"), ("Accept", "*/*")), UPSTREAM_KEY)
        assert [k for k in out if k.lower() == name.lower() and k.lower() != "authorization"] == []
        assert "value" not in out.values()
        assert out["Accept"] == "*/*"

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("HTTP-Referer", "https://kilocode.ai"),
            ("X-Title", "Kilo Code"),
            ("User-Agent", "Kilo-Code/4.0"),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "gzip"),
            ("Accept-Language", "en"),
            ("X-Stainless-Lang", "js"),
            ("X-Unknown-Header", "kept"),
            ("X-Kilo", "not-the-kilocode-prefix"),
            ("X-KiloCodeOrganizationId", "no-dash-after-prefix"),
        ],
    )
    def test_keeps(self, name: str, value: str):
        """Headers the upstream uses, and unknown ones, pass through unchanged."""
        out = forward_headers(headers((name, value)), UPSTREAM_KEY)
        assert out.getall(name) == [value]

    def test_plain_body_drops_only_accept_encoding(self):
        """For metered requests the upstream is not offered compression; the rest stays."""
        client = headers(("accept-encoding", "gzip, br"), ("Accept", "*/*"))
        out = forward_headers(client, UPSTREAM_KEY, plain_body=True)
        assert "Accept-Encoding" not in out
        assert out["Accept"] == "*/*"

    @pytest.mark.parametrize(
        "client_auth",
        [
            [],
            [("Authorization", "Bearer kilo_user_token")],
            [("authorization", "Basic dXNlcjpwYXNz")],
            [("Authorization", "Bearer one"), ("Authorization", "Bearer two")],
        ],
    )
    def test_authorization_is_the_upstream_key(self, client_auth: list[tuple[str, str]]):
        """Exactly one Authorization goes upstream: Bearer with the gateway's key."""
        out = forward_headers(headers(*client_auth), UPSTREAM_KEY)
        assert out.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]

    @pytest.mark.parametrize(
        ("connection", "named"),
        [
            ("X-Secret", ["X-Secret"]),
            ("close, X-Secret", ["X-Secret"]),
            ("X-One,X-Two", ["X-One", "X-Two"]),
            ("  x-one ,  X-TWO  ", ["X-One", "X-Two"]),
            ("keep-alive, X-Secret,", ["X-Secret"]),
        ],
    )
    def test_drops_headers_named_in_connection(self, connection: str, named: list[str]):
        """A header listed in Connection is hop-by-hop and is not forwarded."""
        pairs = [("Connection", connection), *[(n, "hop") for n in named], ("X-Other", "kept")]
        out = forward_headers(headers(*pairs), UPSTREAM_KEY)
        for name in named:
            assert name not in out
        assert out["X-Other"] == "kept"

    def test_drops_headers_named_in_any_connection_header(self):
        """Names listed in a second Connection header are dropped as well as the first's."""
        out = forward_headers(
            headers(
                ("Connection", "keep-alive"),
                ("Connection", "X-Secret"),
                ("X-Secret", "hop"),
                ("X-Other", "kept"),
            ),
            UPSTREAM_KEY,
        )
        assert "X-Secret" not in out
        assert out["X-Other"] == "kept"

    def test_duplicates_preserved_in_order(self):
        """Repeated headers keep every value, in order, with their original spelling."""
        out = forward_headers(
            headers(
                ("X-Custom", "1"),
                ("Accept", "application/json"),
                ("x-custom", "2"),
                ("X-CUSTOM", "3"),
            ),
            UPSTREAM_KEY,
        )
        assert out.getall("X-Custom") == ["1", "2", "3"]
        assert [k for k, _ in out.items() if k.lower() == "x-custom"] == [
            "X-Custom",
            "x-custom",
            "X-CUSTOM",
        ]

    def test_typical_extension_request(self):
        """A request as the Kilo Code extension sends it goes upstream as OpenRouter expects."""
        out = forward_headers(
            headers(
                ("Host", "gateway.example.test"),
                ("Authorization", "Bearer kilo_user_token"),
                ("X-KiloCode-OrganizationId", "0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11"),
                ("X-KiloCode-TaskId", "task-1"),
                ("HTTP-Referer", "https://kilocode.ai"),
                ("X-Title", "Kilo Code"),
                ("User-Agent", "Kilo-Code/4.0"),
                ("Content-Type", "application/json"),
                ("Content-Length", "123"),
                ("Accept", "text/event-stream"),
                ("Connection", "keep-alive"),
                ("Cookie", "session=abc"),
            ),
            UPSTREAM_KEY,
        )
        assert list(out.items()) == [
            ("HTTP-Referer", "https://kilocode.ai"),
            ("X-Title", "Kilo Code"),
            ("User-Agent", "Kilo-Code/4.0"),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("Authorization", f"Bearer {UPSTREAM_KEY}"),
        ]

    def test_input_not_modified(self):
        """The client's headers are copied, never changed in place."""
        source = CIMultiDict([("Authorization", "Bearer kilo_user_token"), ("X-Title", "t")])
        forward_headers(CIMultiDictProxy(source), UPSTREAM_KEY)
        assert list(source.items()) == [
            ("Authorization", "Bearer kilo_user_token"),
            ("X-Title", "t"),
        ]


class TestRelayHeaders:
    """What the client sees of the upstream's response headers."""

    @pytest.mark.parametrize(
        "name",
        [
            "Set-Cookie",
            "set-cookie",
            "Content-Length",
            "Connection",
            "Keep-Alive",
            "Transfer-Encoding",
            "TE",
            "Trailer",
            "Upgrade",
            "Proxy-Authenticate",
            "Proxy-Connection",
        ],
    )
    def test_drops(self, name: str):
        """Cookies, framing and hop-by-hop headers from the upstream are not relayed."""
        out = relay_headers(headers((name, "value"), ("Content-Type", "text/plain")), REQUEST_ID)
        assert name not in out
        assert out["Content-Type"] == "text/plain"

    @pytest.mark.parametrize("name", ["X-Request-Id", "x-request-id", "X-REQUEST-ID"])
    def test_request_id_is_ours(self, name: str):
        """The upstream's X-Request-Id is replaced by the gateway's own, exactly once."""
        out = relay_headers(headers((name, "upstream-id"), (name, "again")), REQUEST_ID)
        assert out.getall("X-Request-Id") == [REQUEST_ID]

    @pytest.mark.parametrize(
        "upstream",
        [
            [],
            [("X-Accel-Buffering", "yes")],
            [("x-accel-buffering", "yes"), ("X-Accel-Buffering", "")],
        ],
    )
    def test_disables_proxy_buffering(self, upstream: list[tuple[str, str]]):
        """X-Accel-Buffering is always exactly `no`, so nginx in front streams as it arrives."""
        out = relay_headers(headers(*upstream), REQUEST_ID)
        assert out.getall("X-Accel-Buffering") == ["no"]

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("Content-Type", "text/event-stream"),
            ("Content-Encoding", "gzip"),
            ("Cache-Control", "no-cache"),
            ("Vary", "Accept-Encoding"),
            ("X-RateLimit-Remaining", "99"),
            ("X-Generation-Id", "gen-123"),
            ("CF-Ray", "8a1b2c3d"),
        ],
    )
    def test_keeps(self, name: str, value: str):
        """Every other upstream header reaches the client unchanged."""
        assert relay_headers(headers((name, value)), REQUEST_ID).getall(name) == [value]

    def test_duplicates_preserved(self):
        """Repeated upstream headers keep every value in order."""
        out = relay_headers(headers(("Vary", "Accept"), ("Vary", "Origin")), REQUEST_ID)
        assert out.getall("Vary") == ["Accept", "Origin"]

    def test_typical_stream_response(self):
        """An SSE response from OpenRouter is relayed as the extension expects."""
        out = relay_headers(
            headers(
                ("Content-Type", "text/event-stream"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "keep-alive"),
                ("Set-Cookie", "__cf_bm=abc; Secure"),
                ("X-Request-Id", "upstream-id"),
                ("Cache-Control", "no-cache"),
            ),
            REQUEST_ID,
        )
        assert list(out.items()) == [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("X-Request-Id", REQUEST_ID),
        ]


class TestMetricRoute:
    """Which route label a request is counted under."""

    @pytest.mark.parametrize("tail", sorted(KNOWN_PATHS))
    def test_known_endpoint(self, tail: str):
        """A known endpoint is labelled with its own path."""
        assert metric_route(tail) == f"/api/openrouter/{tail}"

    @pytest.mark.parametrize(
        ("tail", "expected"),
        [
            ("chat/completions?stream=true", "/api/openrouter/chat/completions"),
            ("generation?id=gen-123", "/api/openrouter/generation"),
            ("models?", "/api/openrouter/models"),
        ],
    )
    def test_query_is_ignored(self, tail: str, expected: str):
        """A query string does not change the label."""
        assert metric_route(tail) == expected

    @pytest.mark.parametrize(
        "tail",
        [
            "",
            "generation/gen-1234567890",
            "models/openai/gpt-4o",
            "models/0b9e4a5e-6a3c-4a8e-9a43-5f2a1f9c0d11",
            "chat/completions/extra",
            "chat",
            "Chat/Completions",
            "MODELS",
            "v1/chat/completions",
            "credits",
            "auth/key",
            "key",
            "gen-1234567890",
            "other",
        ],
    )
    def test_anything_else_is_other(self, tail: str):
        """Ids and unknown paths share one label, so labels stay few."""
        assert metric_route(tail) == "/api/openrouter/other"

"""Every aiohttp internal the gateway touches (`platform/aiohttp_internals.py`) is there.

An aiohttp release that renames one of them fails here, by name, rather than somewhere
in the connection handling at run time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_parser import SINGLETON_HEADERS as aiohttp_singletons

from gateway.platform import aiohttp_internals
from gateway.platform.aiohttp_internals import INTERNALS, Internal
from gateway.serve.heads import SINGLETON_HEADERS


@pytest.fixture
async def real_objects() -> AsyncIterator[dict[type[Any], Any]]:
    """A real server and one of its connection handlers, made as aiohttp makes them."""

    async def handler(_request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler, keepalive_timeout=5.0)
    connection_handler = server()
    yield {web.Server: server, web.RequestHandler: connection_handler}
    await server.shutdown(0)


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: f"{i.owner.__name__}.{i.name}")
def test_each_internal_the_gateway_uses_exists(
    internal: Internal, real_objects: dict[type[Any], Any]
) -> None:
    owner = real_objects[internal.owner] if internal.on_instance else internal.owner
    assert hasattr(owner, internal.name), f"{internal.name}: {internal.why}"


async def test_the_helpers_read_what_they_say(real_objects: dict[type[Any], Any]) -> None:
    server, handler = real_objects[web.Server], real_objects[web.RequestHandler]
    assert aiohttp_internals.requests_read(handler) == 0
    assert aiohttp_internals.waiting_for_request(handler) is False  # no connection yet
    assert aiohttp_internals.handler_server(handler) is server
    assert aiohttp_internals.handler_loop(handler) is asyncio.get_running_loop()
    assert aiohttp_internals.server_setting(server, "keepalive_timeout", None) == 5.0
    assert aiohttp_internals.server_setting(server, "lingering_time", 1.5) == 1.5
    made = aiohttp_internals.new_handler(server, web.RequestHandler)
    assert aiohttp_internals.handler_server(made) is server


def test_the_module_names_every_private_attribute_it_reads() -> None:
    """No private aiohttp name is used in the module without an entry in INTERNALS."""
    source = Path(aiohttp_internals.__file__).read_text(encoding="utf-8")
    code = source.split("INTERNALS: tuple", 1)[1].split(")\n\n\n", 1)[1]
    used = set(re.findall(r"\.(_[a-z][a-z_]*)\b", code))
    listed = {internal.name for internal in INTERNALS}
    assert used <= listed, used - listed


def test_the_fast_path_knows_the_headers_aiohttp_refuses_twice() -> None:
    assert {name.lower() for name in aiohttp_singletons} == SINGLETON_HEADERS

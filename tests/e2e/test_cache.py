"""The result cache: a read-only tool of a server with `cache_ttl` is answered from the cache
within its TTL (the upstream sees one call) and not after; a tool that is not read-only never is;
`_meta["concord/cache"] = "bypass"` goes to the upstream."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from conftest import NodeFactory, connect, fixture_server, text_of

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    node = concord.start("cache", {"fx": fixture_server("fx", cache_ttl="1s")})
    yield node
    node.stop()


async def upstream_calls(client: Any) -> int:
    stats = await client.call_tool("fx__stats", {}, meta={"concord/cache": "bypass"})
    return stats.structured_content["calls"]


def cached(result: Any) -> bool:
    return bool(result.meta) and result.meta.get("concord/cache") == "hit"


async def test_read_only_results_are_served_from_the_cache_within_their_ttl(node: Any) -> None:
    async with connect(node.url) as client:
        before = await upstream_calls(client)
        first = await client.call_tool("fx__echo", {"message": "cache me"})
        second = await client.call_tool("fx__echo", {"message": "cache me"})
        assert text_of(first) == text_of(second) == "Echo: cache me"
        assert not cached(first) and cached(second)
        other = await client.call_tool("fx__echo", {"message": "other arguments"})
        assert not cached(other)
        bypassed = await client.call_tool("fx__echo", {"message": "cache me"}, meta={"concord/cache": "bypass"})
        assert not cached(bypassed)
        # stats (bypassed) + echo + other + bypassed echo reached the upstream; the hit did not.
        assert await upstream_calls(client) - before == 4

        time.sleep(1.2)
        expired = await client.call_tool("fx__echo", {"message": "cache me"})
        assert not cached(expired), "served after its TTL"

    with urllib.request.urlopen(node.url.removesuffix("/mcp") + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'concord_result_cache_lookups_total{server="fx",outcome="hit"} 1' in metrics, metrics


async def test_a_tool_that_is_not_read_only_is_never_cached(node: Any) -> None:
    async with connect(node.url) as client:
        before = await upstream_calls(client)
        for _ in range(2):
            result = await client.call_tool("fx__touch", {"uri": "fixture://fx/info"})
            assert not cached(result)
        assert await upstream_calls(client) - before == 3

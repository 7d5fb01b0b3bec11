"""The result cache: a read-only tool of a server with `cache_ttl` is answered from the cache
within its TTL (the upstream sees one call) and not after; a tool that is not read-only never is;
`_meta["concord/cache"] = "bypass"` goes to the upstream."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest

from conftest import NodeFactory, connect, eventually, fixture_server, text_of

pytestmark = pytest.mark.anyio

# The server's TTL is long enough for any check made within it; `review` alone has a short one,
# for the check that an entry is not served after its TTL.
SHORT_TTL = """
[servers.fx.tools.review]
cache_ttl = "1s"
"""


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    node = concord.start("cache", {"fx": fixture_server("fx", cache_ttl="600s")}, extra_config=SHORT_TTL)
    yield node
    node.stop()


def cache_hits(node: Any) -> int:
    """concord_result_cache_lookups_total of fx's hits (0 before the first)."""
    with urllib.request.urlopen(node.url.removesuffix("/mcp") + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    found = re.findall(r'^concord_result_cache_lookups_total\{server="fx",outcome="hit"\} (\d+)$', metrics, re.M)
    assert len(found) <= 1, found
    return int(found[0]) if found else 0


async def upstream_calls(client: Any) -> int:
    stats = await client.call_tool("fx__stats", {}, meta={"concord/cache": "bypass"})
    return stats.structured_content["calls"]


def cached(result: Any) -> bool:
    return bool(result.meta) and result.meta.get("concord/cache") == "hit"


async def test_read_only_results_are_served_from_the_cache_within_their_ttl(node: Any) -> None:
    hits_before = cache_hits(node)
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
    assert cache_hits(node) - hits_before == 1


async def test_an_entry_is_not_served_after_its_ttl(node: Any) -> None:
    """`review` is cached for 1 s: repeated, it is answered from the cache until the entry
    expires, then by the upstream again. No clock in the test: it repeats the call until a hit
    is followed by a miss (fails if that never happens)."""
    arguments = {"key": "plans/q3", "proposed_value": "a plan"}
    hits_before = cache_hits(node)
    async with connect(node.url) as client:
        before = await upstream_calls(client)
        first = await client.call_tool("fx__review", arguments)
        assert not first.is_error and not cached(first), first
        outcomes: list[bool] = []  # cached or not, call by call

        async def a_hit_then_a_miss() -> bool:
            result = await client.call_tool("fx__review", arguments)
            assert not result.is_error and text_of(result) == text_of(first), result
            outcomes.append(cached(result))
            return len(outcomes) >= 2 and outcomes[-2] and not outcomes[-1]

        await eventually(a_hit_then_a_miss, timeout=30, interval=0.05, what="a cached review to expire")
        # Every miss (the first call included) reached the upstream, no hit did; plus the stats call.
        misses = 1 + outcomes.count(False)
        assert await upstream_calls(client) - before == misses + 1, outcomes
    assert cache_hits(node) - hits_before == outcomes.count(True), outcomes


async def test_a_tool_that_is_not_read_only_is_never_cached(node: Any) -> None:
    async with connect(node.url) as client:
        before = await upstream_calls(client)
        for _ in range(2):
            result = await client.call_tool("fx__touch", {"uri": "fixture://fx/info"})
            assert not cached(result)
        assert await upstream_calls(client) - before == 3


TOOL_SETTINGS = """
[servers.fx.tools.touch]
cache_ttl = "30s"
[servers.fx.tools.log]
cache_ttl = "0s"
"""


async def test_per_tool_settings_make_a_tool_cacheable_or_not(concord: NodeFactory) -> None:
    """`[servers.NAME.tools.TOOL] cache_ttl` vouches for a tool without readOnlyHint (cached)
    and turns caching off for a read-only one (`0s`)."""
    node = concord.start("cache-tools", {"fx": fixture_server("fx", cache_ttl="30s")}, extra_config=TOOL_SETTINGS)
    try:
        async with connect(node.url) as client:
            before = await upstream_calls(client)
            first = await client.call_tool("fx__touch", {"uri": "fixture://fx/info"})
            second = await client.call_tool("fx__touch", {"uri": "fixture://fx/info"})
            assert not cached(first) and cached(second)
            for _ in range(2):
                logged = await client.call_tool("fx__log", {"message": "never cached"})
                assert not cached(logged)
            # touch once + log twice reached the upstream, plus the stats call itself.
            assert await upstream_calls(client) - before == 4
    finally:
        node.stop()


async def test_two_principals_never_share_an_entry(concord: NodeFactory) -> None:
    from test_governance import AUDIENCE, ISSUER, SECRET, as_principal, token_for

    extra = f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
[[auth.keys]]
kid = "e2e"
algorithm = "HS256"
secret = "{SECRET}"
[policy]
[[policy.rules]]
name = "everyone"
effect = "allow"
when = 'true'
"""
    node = concord.start("cache-auth", {"fx": fixture_server("fx", cache_ttl="30s")}, extra_config=extra)
    try:
        alice, bob = token_for("alice", ["user"]), token_for("bob", ["user"])
        async with as_principal(node.url, alice) as as_alice, as_principal(node.url, bob) as as_bob:
            before = await upstream_calls(as_alice)
            a1 = await as_alice.call_tool("fx__echo", {"message": "same question"})
            a2 = await as_alice.call_tool("fx__echo", {"message": "same question"})
            b1 = await as_bob.call_tool("fx__echo", {"message": "same question"})
            b2 = await as_bob.call_tool("fx__echo", {"message": "same question"})
            assert not cached(a1) and cached(a2), "alice's own repeat is a hit"
            assert not cached(b1), "bob was served alice's entry"
            assert cached(b2)
            # alice's first call and bob's first call reached the upstream.
            assert await upstream_calls(as_bob) - before == 3
    finally:
        node.stop()


async def test_long_results_are_cut_to_the_callers_token_limit_and_readable_in_pages(concord: NodeFactory) -> None:
    node = concord.start(
        "result-budget", {"fx": fixture_server("fx")}, extra_config="[routing]\nmax_result_tokens = 400\n"
    )
    try:
        words = " ".join(f"w{i}" for i in range(3000))
        async with connect(node.url) as client:
            short = await client.call_tool("fx__echo", {"message": "short"})
            assert text_of(short) == "Echo: short" and not (short.meta or {}).get("concord/truncated")

            # The caller asks for fewer tokens than the node's default.
            result = await client.call_tool(
                "fx__echo", {"message": words}, meta={"concord/max_result_tokens": 50}
            )
            texts = [block.text for block in result.content]
            assert len(texts) == 2, texts
            head, marker = texts
            assert ("Echo: " + words).startswith(head) and len(head) < len(words) // 10, head
            assert "result truncated to fit 50 tokens" in marker and "concord__result_page" in marker, marker
            truncated = result.meta["concord/truncated"]
            assert truncated["keptTokens"] <= 50 < truncated["totalTokens"], truncated
            # echo declares an output schema, so its structured content must stay whole.
            assert result.structured_content == {"echo": words}

            # The rest, page by page, joins up to the whole answer.
            read = head
            for _ in range(100):
                page = await client.call_tool(
                    "concord__result_page", {"handle": truncated["handle"], "max_tokens": 2000}
                )
                assert not page.is_error, text_of(page)
                parts = [block.text for block in page.content]
                read += parts[0]
                if len(parts) == 1:
                    break
            assert read == "Echo: " + words

            # The node's default applies when the caller says nothing; a spent handle is refused.
            default = await client.call_tool("fx__echo", {"message": words})
            assert default.meta["concord/truncated"]["keptTokens"] <= 400
            spent = await client.call_tool("concord__result_page", {"handle": truncated["handle"]})
            assert spent.is_error and "unknown or expired handle" in text_of(spent)
    finally:
        node.stop()

"""Upstream session loss: when a streamable HTTP upstream restarts (its sessions are gone and it
answers the old session id with 404), the gateway re-establishes the session for the next call
and the client's own session with the gateway keeps working; it never sees a half-dead session."""

from __future__ import annotations

import pytest

from conftest import NodeFactory, _start_everything, connect, text_of

pytestmark = pytest.mark.anyio


async def test_upstream_restart_is_invisible_to_the_client(
    concord: NodeFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upstream = _start_everything(tmp_path_factory, "streamableHttp")
    port = upstream.port
    # Health checks far apart, so that recovery is the call path's own doing.
    node = concord.start("session-loss", {"remote": {"url": f"http://127.0.0.1:{port}/mcp"}}, health_interval="300s")
    try:
        async with connect(node.url) as client:
            first = await client.call_tool("remote__echo", {"message": "before"})
            assert not first.is_error, text_of(first)
            assert text_of(first) == "Echo: before"

            upstream.stop()
            upstream = _start_everything(tmp_path_factory, "streamableHttp", port=port)

            # Same client session, same tool: the gateway notices the expired upstream session
            # (HTTP 404), initializes a new one and retries, so this call simply succeeds.
            second = await client.call_tool("remote__echo", {"message": "after"})
            assert not second.is_error, text_of(second)
            assert text_of(second) == "Echo: after"
            third = await client.call_tool("remote__get-sum", {"a": 2, "b": 3})
            assert not third.is_error, text_of(third)
            assert text_of(third) == "The sum of 2 and 3 is 5.", text_of(third)
    finally:
        node.stop()
        upstream.stop()

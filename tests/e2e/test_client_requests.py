"""Server-to-client requests through the gateway: sampling and elicitation that an upstream
makes while serving a call go to the client that made the call, and to no other client; the
answer goes back to that upstream.

Upstream: server-everything over streamable HTTP (it sends these requests on the response
stream of the call they belong to) and over stdio (one call in flight at a time).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp.types import CreateMessageResult, ElicitResult, TextContent

from conftest import EVERYTHING_JS, NODE_BIN, NodeFactory, PeerServer, Rendezvous, connect, stdio_server, text_of

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def node(concord: NodeFactory, everything_http: PeerServer):
    node = concord.start(
        "client-requests",
        {
            "everything": stdio_server(NODE_BIN, EVERYTHING_JS, "stdio"),
            "everything_http": {"url": f"http://127.0.0.1:{everything_http.port}/mcp"},
        },
        health_interval="1s",
    )
    yield node
    node.stop()


def sampler(name: str, seen: list[str], rendezvous: Rendezvous | None = None) -> Any:
    """A sampling callback that records the prompts it is asked and answers as `name`."""

    async def sample(context: Any, params: Any) -> CreateMessageResult:
        prompt = params.messages[0].content.text
        seen.append(prompt)
        if rendezvous is not None:
            await rendezvous.wait()
        return CreateMessageResult(
            role="assistant",
            content=TextContent(type="text", text=f"answer from {name}"),
            model=f"model-{name}",
        )

    return sample


@pytest.mark.parametrize("server", ["everything", "everything_http"])
async def test_sampling_reaches_the_calling_client_and_its_answer_the_upstream(node: Any, server: str) -> None:
    seen: list[str] = []
    async with connect(node.url, sampling_callback=sampler("solo", seen)) as client:
        result = await client.call_tool(f"{server}__trigger-sampling-request", {"prompt": "ping?", "maxTokens": 10})
        text = text_of(result)
        assert not result.is_error, text
        assert "answer from solo" in text, text
        assert "model-solo" in text, text
    assert len(seen) == 1 and "ping?" in seen[0], seen


async def test_concurrent_sampling_requests_stay_with_their_own_clients(node: Any) -> None:
    seen_a: list[str] = []
    seen_b: list[str] = []
    results: dict[str, str] = {}
    # Neither answers before both have been asked: the two requests overlap at the gateway.
    both = Rendezvous(2)

    async def call(name: str, seen: list[str]) -> None:
        async with connect(node.url, sampling_callback=sampler(name, seen, both)) as client:
            result = await client.call_tool(
                "everything_http__trigger-sampling-request", {"prompt": f"question of {name}", "maxTokens": 10}
            )
            assert not result.is_error, text_of(result)
            results[name] = text_of(result)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(call, "alice", seen_a)
            group.start_soon(call, "bob", seen_b)

    assert both.everyone.is_set(), "the two sampling requests were never in flight together"
    assert len(seen_a) == 1 and "question of alice" in seen_a[0], seen_a
    assert len(seen_b) == 1 and "question of bob" in seen_b[0], seen_b
    assert "answer from alice" in results["alice"] and "answer from bob" not in results["alice"], results
    assert "answer from bob" in results["bob"] and "answer from alice" not in results["bob"], results


async def test_client_without_sampling_gets_a_clear_refusal_not_a_hang(node: Any) -> None:
    async with connect(node.url) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("everything_http__trigger-sampling-request", {"prompt": "x", "maxTokens": 5})
    # The upstream asked; the gateway told it this client cannot sample; the upstream reports it.
    assert result.is_error, result
    assert "does not support sampling/createMessage" in text_of(result), text_of(result)


async def test_elicitation_round_trip(node: Any) -> None:
    asked: list[Any] = []

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params)
        return ElicitResult(action="decline")

    async with connect(node.url, elicitation_callback=elicit) as client:
        result = await client.call_tool("everything_http__trigger-elicitation-request", {})
    assert len(asked) == 1, asked
    assert not result.is_error, text_of(result)
    assert "decline" in text_of(result).lower(), text_of(result)


async def test_url_mode_elicitation_round_trip(node: Any) -> None:
    asked: list[Any] = []

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params)
        return ElicitResult(action="accept")

    async with connect(node.url, elicitation_callback=elicit) as client:
        result = await client.call_tool(
            "everything_http__trigger-url-elicitation",
            {"url": "https://example.com/authorize", "message": "Please sign in"},
        )
    assert len(asked) == 1, asked
    assert asked[0].mode == "url" and asked[0].url == "https://example.com/authorize", asked[0]
    assert not result.is_error, text_of(result)
    assert "https://example.com/authorize" in text_of(result), text_of(result)

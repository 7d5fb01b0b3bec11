"""The 2026-07-28 protocol era through the gateway, with the official Python SDK's default
client (it negotiates 2026-07-28 through `server/discover`): sessionless requests, and the
`subscriptions/listen` stream carrying list changes and resource updates, while the upstreams
speak 2025-11-25 and a 2025-era client uses the same node at the same time."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.subscriptions import ResourceUpdated, ToolsListChanged

from conftest import NodeFactory, connect, fixture_server, text_of, tool_names

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    node = concord.start("modern", {"fx": fixture_server("fx")}, health_interval="1s")
    yield node
    node.stop()


async def test_discover_and_sessionless_calls(node: Any) -> None:
    async with Client(node.url, cache=None) as modern:
        assert modern.protocol_version == "2026-07-28"
        assert "fx__echo" in await tool_names(modern)
        assert text_of(await modern.call_tool("fx__echo", {"message": "new era"})) == "Echo: new era"
        contents = (await modern.read_resource("fixture://fx/items/3")).contents
        assert len(contents) == 1, contents
        assert contents[0].text == "fx served fixture://fx/items/3"


async def test_listen_streams_list_changes_and_resource_updates_beside_a_legacy_client(node: Any) -> None:
    uri = "fixture://fx/info"
    events: list[Any] = []
    async with (
        Client(node.url, cache=None) as modern,
        connect(node.url) as legacy,
    ):
        # Each era as negotiated: the point is the two of them at once.
        assert modern.protocol_version == "2026-07-28", modern.protocol_version
        assert legacy.protocol_version == "2025-11-25", legacy.protocol_version
        async with modern.listen(tools_list_changed=True, resource_subscriptions=[uri]) as subscription:

            async def collect() -> None:
                async for event in subscription:
                    events.append(event)

            async with anyio.create_task_group() as group:
                group.start_soon(collect)
                # The legacy client drives the upstream; the modern client hears about it.
                assert (await legacy.call_tool("fx__stats", {})).structured_content["subscribed"] == [uri]
                assert text_of(await legacy.call_tool("fx__touch", {"uri": uri})) == "announced"
                await legacy.call_tool("fx__add_tool", {"name": "modern_late"})
                with anyio.fail_after(10):
                    while not (
                        any(isinstance(e, ResourceUpdated) and e.uri == uri for e in events)
                        and any(isinstance(e, ToolsListChanged) for e in events)
                    ):
                        await anyio.sleep(0.05)
                group.cancel_scope.cancel()
        assert "fx__modern_late" in await tool_names(modern)

        # Closing the listen stream released the upstream subscription.
        with anyio.fail_after(10):
            while (await legacy.call_tool("fx__stats", {})).structured_content["subscribed"]:
                await anyio.sleep(0.05)


@pytest.fixture(scope="module")
def sampling_node(concord: NodeFactory):
    from conftest import EVERYTHING_JS, NODE_BIN, stdio_server

    node = concord.start("modern-sampling", {"everything": stdio_server(NODE_BIN, EVERYTHING_JS, "stdio")})
    yield node
    node.stop()


async def test_upstream_sampling_becomes_an_input_required_round_trip(sampling_node: Any) -> None:
    """The upstream (2025-11-25) sends sampling/createMessage mid-call; a 2026-07-28 client has no
    channel for server requests, so the gateway answers the call with `input_required`, the SDK
    runs its sampling callback and retries with the answer, and the gateway resumes the same
    upstream call with it."""
    from mcp.types import CreateMessageResult, TextContent

    asked: list[str] = []

    async def sample(context: Any, params: Any) -> CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="modern answer"), model="modern-model"
        )

    async with Client(sampling_node.url, cache=None, sampling_callback=sample) as modern:
        assert modern.protocol_version == "2026-07-28"
        result = await modern.call_tool("everything__trigger-sampling-request", {"prompt": "round trip?", "maxTokens": 5})
    assert len(asked) == 1 and "round trip?" in asked[0], asked
    assert not result.is_error, text_of(result)
    assert "modern answer" in text_of(result) and "modern-model" in text_of(result), text_of(result)


async def test_a_made_up_request_state_is_refused(node: Any) -> None:
    async with Client(node.url, cache=None) as modern:
        from mcp import MCPError

        with pytest.raises(MCPError) as refused:
            await modern.session.call_tool(
                "fx__echo", {"message": "x"}, request_state="concord-parked-forged", input_responses={}
            )
        assert "unknown or expired requestState" in str(refused.value)


async def test_log_messages_follow_the_per_request_log_level(node: Any) -> None:
    """A 2026-07-28 client asks for logs on each request (`_meta` log level) and hears the
    upstream's log messages of that call on the call's own stream, at or above that level only."""
    from mcp.types import LoggingMessageNotificationParams

    heard: dict[str, list[LoggingMessageNotificationParams]] = {"warning": [], "error": [], "none": []}

    def collector(name: str) -> Any:
        async def collect(params: LoggingMessageNotificationParams) -> None:
            heard[name].append(params)

        return collect

    async with (
        Client(node.url, cache=None, log_level="warning", logging_callback=collector("warning")) as warned,
        Client(node.url, cache=None, log_level="error", logging_callback=collector("error")) as strict,
        Client(node.url, cache=None, logging_callback=collector("none")) as silent,
    ):
        for client, name in ((warned, "warning"), (strict, "error"), (silent, "none")):
            assert client.protocol_version == "2026-07-28"
            assert text_of(await client.call_tool("fx__log", {"message": f"note for {name}"})) == "logged"

    assert [(p.level, p.logger, p.data) for p in heard["warning"]] == [("warning", "fx", "note for warning")]
    assert heard["error"] == [], "a warning is below the error level the client asked for"
    assert heard["none"] == [], "a client that asked for no logs gets none"

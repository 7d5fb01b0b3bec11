"""One Concord node fronting real MCP servers, driven by real MCP clients.

The node (module-scoped) fronts:
  everything       server-everything over stdio
  everything_http  server-everything over streamable HTTP (started by the suite)
  everything_sse   server-everything over legacy HTTP+SSE (started by the suite)
  filesystem       server-filesystem, allowed dir = a tmp dir
  memory           server-memory, MEMORY_FILE_PATH in the tmp dir
  fx               concord-fixture over stdio
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import (
    PromptReference,
    ResourceTemplateReference,
    ResourceUpdatedNotification,
    ToolListChangedNotification,
)
from pydantic import ValidationError

from conftest import (
    CONCORD_BIN,
    EVERYTHING_JS,
    FILESYSTEM_JS,
    INSPECTOR_BIN,
    MEMORY_JS,
    NODE_BIN,
    PEERS,
    Node,
    NodeFactory,
    PeerServer,
    connect,
    eventually,
    fixture_server,
    http_get,
    list_all_tools,
    stdio_server,
    text_of,
    tool_names,
    wait_until,
)

pytestmark = pytest.mark.anyio

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Gateway:
    def __init__(self, node: Node, allowed_dir: Path, memory_file: Path, everything_http_url: str) -> None:
        self.node = node
        self.allowed_dir = allowed_dir
        self.memory_file = memory_file
        self.everything_http_url = everything_http_url

    @property
    def url(self) -> str:
        return self.node.url


@pytest.fixture(scope="module")
def gateway(concord: NodeFactory, everything_http: PeerServer, everything_sse: PeerServer):
    directory = concord.new_dir("gateway")
    allowed = directory / "allowed"
    allowed.mkdir()
    memory_file = directory / "memory.jsonl"
    everything_http_url = f"http://127.0.0.1:{everything_http.port}/mcp"
    node = concord.start(
        "gateway",
        {
            "everything": stdio_server(NODE_BIN, EVERYTHING_JS, "stdio"),
            "everything_http": {"url": everything_http_url},
            "everything_sse": {"url": f"http://127.0.0.1:{everything_sse.port}/sse"},
            "filesystem": stdio_server(NODE_BIN, FILESYSTEM_JS, allowed),
            "memory": stdio_server(NODE_BIN, MEMORY_JS, env={"MEMORY_FILE_PATH": str(memory_file)}),
            "fx": fixture_server("fx"),
        },
        directory=directory,
        health_interval="1s",
    )
    yield Gateway(node, allowed, memory_file, everything_http_url)
    node.stop()


def dump(model: Any) -> dict[str, Any]:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------------------


def test_readyz_reports_every_upstream_healthy(gateway: Gateway) -> None:
    status, body = gateway.node.readyz()
    assert status == 200
    assert body["ready"] is True
    servers = {s["name"]: s for s in body["servers"]}
    assert set(servers) == {"everything", "everything_http", "everything_sse", "filesystem", "memory", "fx"}
    for name, server in servers.items():
        assert server["state"] == "healthy", f"{name}: {server}"
        assert server["tools"] > 0, f"{name}: {server}"
    assert servers["everything"]["transport"] == "stdio"
    assert servers["everything_sse"]["transport"] == "sse"
    # Every upstream tool, plus the node's own built-in tools (state, and reading truncated results).
    builtins = {"state_get", "state_list", "state_put", "state_propose", "state_commit", "state_history",
                "state_claim", "state_release", "state_changes", "state_diff", "result_page"}
    assert body["tools"] == sum(s["tools"] for s in servers.values()) + len(builtins)
    status, text = http_get(f"{gateway.node.base_url}/healthz")
    assert status == 200 and text.strip() == "ok"


async def test_tools_from_every_server_are_namespaced(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        tools = {t.name: t for t in await list_all_tools(client)}
    expected = {
        "everything__echo",
        "everything__get-sum",
        "everything_http__echo",
        "everything_sse__echo",
        "filesystem__read_text_file",
        "filesystem__write_file",
        "memory__read_graph",
        "memory__create_entities",
        "fx__echo",
        "fx__slow",
    }
    assert expected <= set(tools), f"missing: {sorted(expected - set(tools))}"
    # Nothing is exposed without its server's namespace.
    prefixes = ("everything__", "everything_http__", "everything_sse__", "filesystem__", "memory__", "fx__", "concord__")
    assert all(name.startswith(prefixes) for name in tools), sorted(n for n in tools if not n.startswith(prefixes))
    assert "echo" not in tools

    # The fixture's echo, exactly as the fixture declares it (see concord-fixture's tool_list).
    echo = dump(tools["fx__echo"])
    assert echo["annotations"] == {"readOnlyHint": True}
    assert echo["outputSchema"] == {"type": "object", "properties": {"echo": {"type": "string"}}}
    assert echo["inputSchema"] == {"type": "object", "properties": {"message": {"type": "string"}}}
    assert echo["description"] == "Echoes back the message"
    assert dump(tools["fx__crash"])["annotations"] == {"readOnlyHint": False}


async def test_tool_definitions_survive_unchanged(gateway: Gateway) -> None:
    """Every descriptive field of a real server's tools (title, description, schemas,
    annotations, outputSchema, icons, _meta) reaches the client as the server declared it;
    only the name gains the namespace."""
    async with connect(gateway.everything_http_url) as direct:
        upstream = {t.name: dump(t) for t in await list_all_tools(direct)}
    async with connect(gateway.url) as client:
        through = {t.name: dump(t) for t in await list_all_tools(client)}
    compared = 0
    for name in ("echo", "get-sum", "get-structured-content", "trigger-long-running-operation"):
        assert name in upstream, f"server-everything no longer has {name}"
        via_gateway = dict(through[f"everything_http__{name}"])
        assert via_gateway.pop("name") == f"everything_http__{name}"
        original = dict(upstream[name])
        original.pop("name")
        # `execution.taskSupport` (2025-11-25 tasks) is dropped on purpose: the gateway does
        # not relay tasks, so it must not advertise task support for a tool.
        original.pop("execution", None)
        via_gateway.pop("execution", None)
        assert via_gateway == original, f"{name} changed on its way through the gateway"
        compared += 1
    assert "outputSchema" in upstream["get-structured-content"]
    assert compared == 4


async def test_call_a_tool_of_each_server(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("everything__echo", {"message": "hello stdio"})
            assert not result.is_error
            assert text_of(result) == "Echo: hello stdio"

            result = await client.call_tool("everything_http__get-sum", {"a": 2, "b": 40})
            assert not result.is_error, text_of(result)
            assert text_of(result) == "The sum of 2 and 40 is 42.", text_of(result)

            result = await client.call_tool("everything_sse__echo", {"message": "hello sse"})
            assert text_of(result) == "Echo: hello sse"

            target = gateway.allowed_dir / "note.txt"
            result = await client.call_tool(
                "filesystem__write_file", {"path": str(target), "content": "written through concord"}
            )
            assert not result.is_error, text_of(result)
            assert target.read_text() == "written through concord"
            result = await client.call_tool("filesystem__read_text_file", {"path": str(target)})
            assert not result.is_error, text_of(result)
            assert text_of(result) == "written through concord"

            entity = {"name": "Ada Lovelace", "entityType": "person", "observations": ["wrote the first program"]}
            result = await client.call_tool("memory__create_entities", {"entities": [entity]})
            assert not result.is_error, text_of(result)
            result = await client.call_tool("memory__read_graph", {})
            assert not result.is_error, text_of(result)
            graph = result.structured_content or json.loads(text_of(result))
            assert entity in graph["entities"], graph
            # The env of the config reached the server: it saved where MEMORY_FILE_PATH says.
            assert "Ada Lovelace" in gateway.memory_file.read_text()

            result = await client.call_tool("fx__echo", {"message": "hello fixture"})
            assert text_of(result) == "Echo: hello fixture"
            assert result.structured_content == {"echo": "hello fixture"}


async def test_unknown_tool_is_invalid_params(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("nosuchserver__echo", {"message": "x"})
    assert caught.value.code == -32602
    assert caught.value.message == "unknown tool: nosuchserver__echo"


async def test_progress_notifications_are_relayed(gateway: Gateway) -> None:
    steps = 5
    async with connect(gateway.url) as client:
        tools = {t.name: t for t in await list_all_tools(client)}
        schema = tools["everything__trigger-long-running-operation"].input_schema
        assert {"duration", "steps"} <= set(schema["properties"]), schema

        progress: list[tuple[float, float | None, str | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, total, message))

        with anyio.fail_after(20):
            result = await client.call_tool(
                "everything__trigger-long-running-operation",
                {"duration": 1, "steps": steps},
                progress_callback=on_progress,
            )
    assert not result.is_error
    assert "completed" in text_of(result)
    assert [p[0] for p in progress] == [float(i) for i in range(1, steps + 1)], progress
    assert all(p[1] == steps for p in progress), progress


async def _progress_runs(url: str, tool: str, steps: int, runs: int) -> list[list[float]]:
    """Calls server-everything's long-running operation with no delay between its steps (its
    progress notifications and its result leave back to back) and records what arrived."""
    seen: list[list[float]] = []
    async with connect(url) as client:
        for _ in range(runs):
            progress: list[float] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            with anyio.fail_after(20):
                result = await client.call_tool(tool, {"duration": 0, "steps": steps}, progress_callback=on_progress)
            assert not result.is_error, text_of(result)
            seen.append(progress)
    return seen


async def test_back_to_back_progress_keeps_order_and_count(gateway: Gateway) -> None:
    """An upstream that sends its progress notifications in order, each before its result,
    must have them all delivered in that order (progress MUST increase), none after the
    result. Control: the same calls made directly to the server."""
    steps, runs = 20, 8
    expected = [float(i) for i in range(1, steps + 1)]
    direct = await _progress_runs(gateway.everything_http_url, "trigger-long-running-operation", steps, runs)
    assert direct == [expected] * runs, f"control (no gateway) failed: {direct}"
    through = {
        upstream: await _progress_runs(gateway.url, f"{upstream}__trigger-long-running-operation", steps, runs)
        for upstream in ("everything", "everything_http")
    }
    wrong = [
        f"{upstream}: " + " ".join(str(int(p)) for p in run)
        for upstream, seen in through.items()
        for run in seen
        if run != expected
    ]
    assert wrong == [], "progress values received through the gateway (expected 1..20 in order):\n" + "\n".join(wrong)


async def test_cancellation_reaches_the_upstream(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        before = (await client.call_tool("fx__stats", {})).structured_content
        first_progress = anyio.Event()
        progress: list[float] = []
        outcome: dict[str, Any] = {}

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)
            first_progress.set()

        scope = anyio.CancelScope()

        async def slow_call() -> None:
            with scope:
                outcome["result"] = await client.call_tool(
                    "fx__slow", {"steps": 50}, progress_callback=on_progress
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_call)
            with anyio.fail_after(10):
                await first_progress.wait()
            scope.cancel()  # the SDK sends notifications/cancelled for the in-flight request
        # The call was cut short (50 steps would have ended with a result), and below: the
        # upstream was told to stop.
        assert "result" not in outcome, "the call finished although it was cancelled"
        assert scope.cancelled_caught

        async def upstream_saw_cancel() -> dict[str, Any] | None:
            stats = (await client.call_tool("fx__stats", {})).structured_content
            return stats if len(stats["cancelled"]) > len(before["cancelled"]) else None

        stats = await eventually(upstream_saw_cancel, timeout=5, interval=0.1, what="fx to get notifications/cancelled")
        assert len(stats["cancelled"]) == len(before["cancelled"]) + 1, stats
        assert progress and progress[0] == 1.0, progress


async def test_meta_is_forwarded_to_the_upstream(gateway: Gateway) -> None:
    meta = {"traceparent": TRACEPARENT, "com.example/tenant": "acme", "custom": {"n": 7}}
    async with connect(gateway.url) as client:
        result = await client.call_tool("fx__echo", {"message": "meta"}, meta=meta)
    assert text_of(result) == "Echo: meta"
    assert result.meta is not None, "the fixture's result _meta was dropped"
    received = result.meta["received"]
    assert received["traceparent"] == TRACEPARENT
    assert received["com.example/tenant"] == "acme"
    assert received["custom"] == {"n": 7}


async def test_tools_list_changed_reaches_the_client(gateway: Gateway) -> None:
    notifications: list[Any] = []

    async def on_message(message: Any) -> None:
        notifications.append(message)

    async with connect(gateway.url, message_handler=on_message) as client:
        assert "fx__late" not in await tool_names(client)
        result = await client.call_tool("fx__add_tool", {"name": "late"})
        assert text_of(result) == "added late"

        async def got_list_changed() -> bool:
            return any(isinstance(m, ToolListChangedNotification) for m in notifications)

        await eventually(got_list_changed, timeout=10, what="notifications/tools/list_changed")
        assert "fx__late" in await tool_names(client)
        result = await client.call_tool("fx__late", {})
        assert text_of(result) == "late ran"


async def test_prompts_and_resources(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert "fx__greet" in prompts
        assert "everything__simple-prompt" in prompts
        assert "everything_http__simple-prompt" in prompts
        assert "greet" not in prompts

        prompt = await client.get_prompt("fx__greet", {"who": "Ada"})
        assert [m.content.text for m in prompt.messages] == ["Hello, Ada!"]

        prompt = await client.get_prompt("everything__simple-prompt")
        assert "simple prompt" in prompt.messages[0].content.text

        resources = {r.uri for r in (await client.list_resources()).resources}
        assert "fixture://fx/info" in resources
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert "fixture://fx/items/{id}" in templates

        contents = (await client.read_resource("fixture://fx/info")).contents
        assert [c.text for c in contents] == ["fx served fixture://fx/info"]
        contents = (await client.read_resource("fixture://fx/items/7")).contents
        assert [c.text for c in contents] == ["fx served fixture://fx/items/7"]


async def test_resource_subscriptions_are_shared_upstream_and_delivered_per_subscriber(gateway: Gateway) -> None:
    uri = "fixture://fx/info"
    seen_a: list[str] = []
    seen_b: list[str] = []

    def recorder(seen: list[str]) -> Any:
        async def on_message(message: Any) -> None:
            if isinstance(message, ResourceUpdatedNotification):
                seen.append(message.params.uri)

        return on_message

    async def stats(client: Client) -> dict[str, Any]:
        return (await client.call_tool("fx__stats", {})).structured_content

    async with (
        connect(gateway.url, message_handler=recorder(seen_a)) as a,
        connect(gateway.url, message_handler=recorder(seen_b)) as b,
    ):
        calls_before = (await stats(a))["subscribe_calls"]
        await a.subscribe_resource(uri)
        await b.subscribe_resource(uri)
        after = await stats(a)
        assert after["subscribe_calls"] == calls_before + 1, "two subscribers, one upstream subscription"
        assert after["subscribed"] == [uri]

        assert text_of(await a.call_tool("fx__touch", {"uri": uri})) == "announced"

        async def both_notified() -> bool:
            return seen_a == [uri] and seen_b == [uri]

        await eventually(both_notified, timeout=10, what="resources/updated at both subscribers")

        await a.unsubscribe_resource(uri)
        assert (await stats(b))["subscribed"] == [uri], "b still holds the subscription"
        await b.call_tool("fx__touch", {"uri": uri})

        async def only_b_notified() -> bool:
            return len(seen_b) == 2

        await eventually(only_b_notified, timeout=10, what="a second update at b")
        # A barrier instead of a pause: a subscribes to another resource of the same upstream
        # and has it updated. a's notifications arrive in order, so had the update b just got
        # gone to a as well, it would be in seen_a before this one.
        marker = "fixture://fx/items/barrier"
        await a.subscribe_resource(marker)
        assert text_of(await a.call_tool("fx__touch", {"uri": marker})) == "announced"

        async def marker_arrived() -> bool:
            return marker in seen_a

        await eventually(marker_arrived, timeout=10, what="the barrier update at a")
        assert seen_a == [uri, marker], "an unsubscribed client gets no more updates"
        await a.unsubscribe_resource(marker)

        await b.unsubscribe_resource(uri)
        assert (await stats(b))["subscribed"] == [], "the last unsubscribe releases the upstream subscription"

        with pytest.raises(MCPError) as unknown:
            await a.subscribe_resource("fixture://nobody/x")
        assert "unknown resource" in str(unknown.value)


async def test_completion_is_routed_to_the_owner(gateway: Gateway) -> None:
    async with connect(gateway.url) as client:
        by_prompt = await client.complete(PromptReference(type="ref/prompt", name="fx__greet"), {"name": "who", "value": "A"})
        assert by_prompt.completion.values == ["fx-Ada", "fx-Alan"]
        by_template = await client.complete(
            ResourceTemplateReference(type="ref/resource", uri="fixture://fx/items/{id}"), {"name": "id", "value": "G"}
        )
        assert by_template.completion.values == ["fx-Grace"]
        with pytest.raises(MCPError) as unknown:
            await client.complete(PromptReference(type="ref/prompt", name="nobody__greet"), {"name": "who", "value": ""})
        assert "unknown prompt" in str(unknown.value)


async def test_upstream_log_messages_reach_the_client(gateway: Gateway) -> None:
    received: list[Any] = []

    async def on_log(params: Any) -> None:
        received.append(params)

    async with connect(gateway.url, logging_callback=on_log) as client:
        await client.set_logging_level("debug")
        result = await client.call_tool("fx__log", {"message": "disk almost full"})
        assert text_of(result) == "logged"
        async def arrived() -> bool:
            return any(p.data == "disk almost full" for p in received)

        await eventually(arrived, timeout=10, what="the upstream's log message")
        entry = next(p for p in received if p.data == "disk almost full")
        assert entry.level == "warning"
        assert entry.logger == "fx", "the gateway names the upstream as the logger"


async def test_log_messages_go_only_to_clients_that_asked_at_that_level(gateway: Gateway) -> None:
    verbose: list[Any] = []
    quiet: list[Any] = []
    silent: list[Any] = []

    def recorder(into: list[Any]) -> Any:
        async def on_log(params: Any) -> None:
            into.append(params)

        return on_log

    async with (
        connect(gateway.url, logging_callback=recorder(verbose)) as a,
        connect(gateway.url, logging_callback=recorder(quiet)) as b,
        connect(gateway.url, logging_callback=recorder(silent)) as c,
    ):
        await a.set_logging_level("info")
        await b.set_logging_level("error")
        # c never asks for logs.
        await c.call_tool("fx__log", {"message": "a warning for whoever asked"})

        async def verbose_got_it() -> bool:
            return any(p.data == "a warning for whoever asked" for p in verbose)

        await eventually(verbose_got_it, timeout=10, what="the warning at the info-level client")
        # A barrier instead of a pause: b and c now ask for warnings, and a second message is
        # sent. Log messages reach a client in the order the upstream sent them, so had the
        # first one gone to b or c, it would be there before the second.
        await b.set_logging_level("warning")
        await c.set_logging_level("warning")
        barrier = "a barrier warning for the clients that now ask"
        await a.call_tool("fx__log", {"message": barrier})

        async def barrier_arrived() -> bool:
            return any(p.data == barrier for p in quiet) and any(p.data == barrier for p in silent)

        await eventually(barrier_arrived, timeout=10, what="the barrier message at the two other clients")
        assert not any(p.data == "a warning for whoever asked" for p in quiet), "error-level client got a warning"
        assert not any(p.data == "a warning for whoever asked" for p in silent), "a client that never asked got logs"


def _inspector(node: Node, *args: str) -> Any:
    command = [str(INSPECTOR_BIN), "--cli", node.url, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=PEERS.parent)
    assert done.returncode == 0, f"{command} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"inspector printed no JSON ({e}):\n{done.stdout}\nstderr:\n{done.stderr}") from None


def test_inspector_cli_lists_and_calls(gateway: Gateway) -> None:
    listed = _inspector(gateway.node, "--method", "tools/list")
    names = {t["name"] for t in listed["tools"]}
    assert {"everything__echo", "fx__echo", "memory__read_graph"} <= names

    called = _inspector(
        gateway.node, "--method", "tools/call", "--tool-name", "everything__echo", "--tool-arg", "message=hi"
    )
    assert not called.get("isError"), called
    texts = [c["text"] for c in called["content"] if c["type"] == "text"]
    assert any("hi" in t for t in texts), called
    assert texts == ["Echo: hi"]


async def test_stdio_bridge(gateway: Gateway) -> None:
    params = StdioServerParameters(command=str(CONCORD_BIN), args=["connect", gateway.url])
    with anyio.fail_after(30):
        async with connect(params) as client:
            names = await tool_names(client)
            assert {"everything__echo", "fx__echo", "filesystem__read_text_file"} <= names
            result = await client.call_tool("everything__echo", {"message": "over the bridge"})
            assert text_of(result) == "Echo: over the bridge"
            result = await client.call_tool("fx__echo", {"message": "bridged"})
            assert result.structured_content == {"echo": "bridged"}


async def test_legacy_sse_upstream(gateway: Gateway) -> None:
    status = gateway.node.server_status("everything_sse")
    assert status["transport"] == "sse"
    assert status["state"] == "healthy"
    async with connect(gateway.url) as client:
        result = await client.call_tool("everything_sse__echo", {"message": "via sse"})
        assert text_of(result) == "Echo: via sse"
        result = await client.call_tool("everything_sse__get-sum", {"a": 1, "b": 2})
        assert not result.is_error, text_of(result)
        assert text_of(result) == "The sum of 1 and 2 is 3.", text_of(result)


def _tool_call_samples(node: Node) -> list[tuple[dict[str, str], float]]:
    metrics = node.metrics()
    pattern = re.compile(r"^concord_tool_calls_total\{([^}]*)\}\s+([0-9.e+]+)$", re.M)
    samples = []
    for labels, value in pattern.findall(metrics):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        samples.append((parsed, float(value)))
    return samples


def _echo_calls(samples: list[tuple[dict[str, str], float]]) -> float:
    """concord_tool_calls_total of everything's echo that succeeded (0 before the first)."""
    echo = [v for labels, v in samples if labels.get("server") == "everything" and labels.get("tool") == "echo"
            and labels.get("outcome") == "ok"]
    assert len(echo) <= 1, samples
    return echo[0] if echo else 0.0


async def test_metrics_count_tool_calls(gateway: Gateway) -> None:
    # The node is shared with the other tests of this module: count from a snapshot.
    before = _echo_calls(_tool_call_samples(gateway.node))
    async with connect(gateway.url) as client:
        result = await client.call_tool("everything__echo", {"message": "count me"})
        assert text_of(result) == "Echo: count me"
    # Counted as the call ends: wait for the count to move, then check it moved by one.
    def counted() -> list[tuple[dict[str, str], float]] | None:
        samples = _tool_call_samples(gateway.node)
        return samples if _echo_calls(samples) > before else None

    samples = wait_until(counted, timeout=10, what="concord_tool_calls_total of everything/echo to count the call")
    assert _echo_calls(samples) == before + 1, (before, samples)


async def test_default_sdk_client_2026_protocol(gateway: Gateway) -> None:
    """The SDK's default client (`mode="auto"`) negotiates the 2026-07-28 protocol with the
    node through `server/discover`. Under that version a server MUST put `resultType` in
    every result, and the SDK rejects a result without it. Tools, prompts and resources must
    work for such a client too."""
    failures: dict[str, str] = {}

    async def check(label: str, operation: Any, extract: Any, wanted: str) -> None:
        try:
            got = extract(await operation)
        except (ValidationError, MCPError) as e:
            failures[label] = " | ".join(str(e).splitlines()[:3])
            return
        if got != wanted:
            failures[label] = f"got {got!r}, wanted {wanted!r}"

    async with Client(gateway.url, cache=None) as client:
        negotiated = client.protocol_version
        assert negotiated == "2026-07-28", negotiated
        assert "everything__echo" in await tool_names(client)
        await check(
            "tools/call everything__echo",
            client.call_tool("everything__echo", {"message": "modern"}),
            text_of,
            "Echo: modern",
        )
        await check(
            "tools/call fx__echo",
            client.call_tool("fx__echo", {"message": "modern"}),
            text_of,
            "Echo: modern",
        )
        await check(
            "prompts/get fx__greet",
            client.get_prompt("fx__greet", {"who": "Ada"}),
            lambda r: r.messages[0].content.text,
            "Hello, Ada!",
        )
        await check(
            "resources/read fixture://fx/info",
            client.read_resource("fixture://fx/info"),
            lambda r: r.contents[0].text,
            "fx served fixture://fx/info",
        )
    assert not failures, f"protocol {negotiated}:\n" + "\n".join(f"  {k}: {v}" for k, v in failures.items())

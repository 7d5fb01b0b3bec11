"""Replicas of one real MCP server (server-everything over streamable HTTP) registered in the mesh
act as one logical server: calls are spread over them, and when one is killed under load the
read-only calls carry on without a client-visible error, a non-idempotent call that was in flight
on it fails with a "may have executed" error and is not replayed, and its circuit breaker opens,
half-opens and closes when the replica comes back."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import CreateMessageResult, TextContent

from conftest import NodeFactory, PeerServer, _start_everything, connect, list_all_tools, text_of, wait_until

pytestmark = pytest.mark.anyio

ROUTING = """
[routing]
breaker_failures = 1
breaker_cooldown = "1s"
retry_attempts = 3
retry_backoff = "20ms"
"""


def post(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=20) as response:
        return response.status, json.loads(response.read())


def replicas_of(node: Any, server: str) -> dict[str, dict[str, Any]]:
    """The gateway's view of every replica of `server`, by upstream name (from /readyz)."""
    with urllib.request.urlopen(node.url.removesuffix("/mcp") + "/readyz", timeout=10) as response:
        body = json.loads(response.read())
    return {s["name"]: s for s in body["servers"] if s["server"] == server}


def register_replicas(node: Any, name: str, version: str, servers: list[PeerServer]) -> str:
    """Registers every server as a replica of `name` over REST and waits until the gateway has
    connected them all; returns the registry URL."""
    registry = node.url.removesuffix("/mcp") + "/api/v1/registry"
    for server in servers:
        status, body = post(
            registry,
            {
                "name": name,
                "version": version,
                "kind": "server",
                "capabilities": ["demo"],
                "ttl_seconds": 600,
                "endpoint": {"url": f"http://127.0.0.1:{server.port}/mcp"},
            },
        )
        assert status == 201, body
    wait_until(
        lambda: len([r for r in replicas_of(node, name).values() if r["state"] == "healthy"]) == len(servers),
        timeout=30,
        what=f"{len(servers)} healthy replicas of {name}",
    )
    return registry


def metric_lines(node: Any, prefix: str) -> list[str]:
    with urllib.request.urlopen(node.url.removesuffix("/mcp") + "/metrics", timeout=10) as response:
        return [line for line in response.read().decode().splitlines() if line.startswith(prefix)]


async def eventually_value(predicate: Any, timeout: float, what: str) -> Any:
    """Like conftest's wait_until, but lets the event loop run (calls in flight keep going)."""
    try:
        with anyio.fail_after(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}") from None


def transitions(node: Any, replica: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in metric_lines(node, "concord_breaker_transitions_total{"):
        if f'replica="{replica}"' in line:
            state = line.split('state="')[1].split('"')[0]
            counts[state] = int(line.rsplit(" ", 1)[1])
    return counts


def retries(node: Any, name: str) -> int:
    total = 0
    for line in metric_lines(node, "concord_upstream_retries_total{"):
        if f'name="{name}"' in line:
            total += int(line.rsplit(" ", 1)[1])
    return total


async def test_three_replicas_one_killed_under_load(
    concord: NodeFactory, tmp_path_factory: pytest.TempPathFactory, dependencies: None
) -> None:
    servers: list[PeerServer] = [_start_everything(tmp_path_factory, "streamableHttp") for _ in range(3)]
    node = concord.start("routing", {}, extra_config=ROUTING)
    try:
        registry = register_replicas(node, "everything", "1.2.0", servers)

        release_sampling = anyio.Event()

        async def slow_sampler(context: Any, params: Any) -> CreateMessageResult:
            await release_sampling.wait()
            return CreateMessageResult(
                role="assistant", content=TextContent(type="text", text="late answer"), model="m"
            )

        async with connect(node.url, sampling_callback=slow_sampler) as client:
            tools = [tool.name for tool in await list_all_tools(client)]
            assert "everything__echo" in tools and "everything__trigger-sampling-request" in tools, tools
            # One logical server: one copy of each tool, however many replicas.
            assert tools.count("everything__echo") == 1, tools

            # Calls are spread over the replicas.
            for i in range(30):
                result = await client.call_tool("everything__echo", {"message": f"warm {i}"})
                assert text_of(result) == f"Echo: warm {i}"

            # A non-idempotent call (trigger-sampling-request is neither read-only nor idempotent)
            # parked on one replica, waiting for its sampling answer: that replica is the victim.
            outcome: dict[str, Any] = {}

            async def non_idempotent_call() -> None:
                try:
                    outcome["result"] = await client.call_tool(
                        "everything__trigger-sampling-request", {"prompt": "hold", "maxTokens": 5}
                    )
                except MCPError as error:
                    outcome["error"] = error

            failures: list[BaseException] = []
            successes = 0
            stop_load = anyio.Event()

            async def reader(index: int) -> None:
                nonlocal successes
                async with connect(node.url) as reader_client:
                    n = 0
                    while not stop_load.is_set():
                        message = f"r{index}-{n}"
                        try:
                            result = await reader_client.call_tool("everything__echo", {"message": message})
                            assert text_of(result) == f"Echo: {message}", text_of(result)
                            successes += 1
                        except BaseException as error:  # noqa: BLE001 - every failure is the finding
                            failures.append(error)
                        n += 1

            async with anyio.create_task_group() as group:
                group.start_soon(non_idempotent_call)
                victim = await eventually_value(
                    lambda: next(
                        (name for name, r in replicas_of(node, "everything").items() if r["in_flight"] == 1), None
                    ),
                    timeout=15,
                    what="the sampling call to be in flight on one replica",
                )
                # Find the victim's process: the replica's name ends in the hash of its endpoint,
                # so ask the registry which endpoint that is.
                with urllib.request.urlopen(registry, timeout=10) as response:
                    entities = json.loads(response.read())["entities"]
                suffix = victim.split("@", 1)[1]
                url = next(e["endpoint"]["url"] for e in entities if e["id"].endswith(suffix))
                victim_port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
                victim_server = next(s for s in servers if s.port == victim_port)

                for index in range(4):
                    group.start_soon(reader, index)
                # The load is flowing before the kill...
                await eventually_value(lambda: successes >= 20, timeout=30, what="20 read-only calls under load")
                before_kill = successes
                breaker_before = transitions(node, victim)
                os.killpg(victim_server.proc.pid, signal.SIGKILL)
                victim_server.proc.wait(timeout=10)
                # ...and keeps flowing after it, until the call parked on the victim has failed
                # and the victim's breaker has opened.
                await eventually_value(
                    lambda: "error" in outcome or "result" in outcome,
                    timeout=30,
                    what="the call in flight on the killed replica to end",
                )
                await eventually_value(
                    lambda: transitions(node, victim).get("open", 0) > breaker_before.get("open", 0),
                    timeout=30,
                    what="the victim's breaker to open",
                )
                after_kill = successes
                await eventually_value(
                    lambda: successes >= after_kill + 20, timeout=30, what="20 more read-only calls after the kill"
                )
                release_sampling.set()
                stop_load.set()

            assert not failures, f"read-only calls saw errors: {failures[:3]!r}"
            assert successes > before_kill > 0, (before_kill, successes)

            error = outcome.get("error")
            assert error is not None, f"the call on the killed replica did not fail: {outcome!r}"
            assert "may have executed" in error.message, error.message
            assert "not retried" in error.message, error.message
            assert error.code in (-32011, -32012), error.code
            assert error.data["mayHaveExecuted"] is True and error.data["retried"] is False, error.data
            assert retries(node, "trigger-sampling-request") == 0, "a non-idempotent call was replayed"

            # The victim's breaker opened (waited for above); while it is down it takes no calls.
            # (It may have opened more than once: a probe after the 1 s cooldown fails while it is down.)
            assert transitions(node, victim).get("open", 0) > breaker_before.get("open", 0), metric_lines(
                node, "concord_breaker"
            )
            for i in range(10):
                result = await client.call_tool("everything__echo", {"message": f"degraded {i}"})
                assert text_of(result) == f"Echo: degraded {i}"

            # The replica comes back on its port: the breaker lets a probe through (half-open)
            # and closes on its success.
            revived = _start_everything(tmp_path_factory, "streamableHttp", port=victim_port)
            servers.append(revived)
            await eventually_value(
                lambda: replicas_of(node, "everything")[victim]["state"] == "healthy",
                timeout=60,
                what="the revived replica to be reconnected",
            )

            async def until_closed() -> None:
                for i in range(2000):
                    await client.call_tool("everything__echo", {"message": f"probe {i}"})
                    if replicas_of(node, "everything")[victim]["breaker"] == "closed" and transitions(
                        node, victim
                    ).get("closed", 0) > breaker_before.get("closed", 0):
                        return
                raise AssertionError(f"the breaker never closed: {replicas_of(node, 'everything')[victim]}")

            with anyio.fail_after(30):
                await until_closed()
            seen = transitions(node, victim)
            assert seen.get("half_open", 0) > breaker_before.get("half_open", 0), (breaker_before, seen)
            assert seen.get("closed", 0) > breaker_before.get("closed", 0), (breaker_before, seen)
    finally:
        node.stop()
        for server in servers:
            server.stop()


async def test_read_only_call_fails_over_when_a_replica_is_unreachable(
    concord: NodeFactory, tmp_path_factory: pytest.TempPathFactory, dependencies: None
) -> None:
    """Two replicas, one of which stops before anything notices: every read-only call still
    answers, the failures are counted as retries, and the dead replica's breaker opens."""
    servers = [_start_everything(tmp_path_factory, "streamableHttp") for _ in range(2)]
    node = concord.start("failover", {}, extra_config=ROUTING, health_interval="60s")
    try:
        register_replicas(node, "pair", "2.0.0", servers)
        retries_before = retries(node, "get-sum")
        async with connect(node.url) as client:
            servers[0].stop()
            for i in range(20):
                result = await client.call_tool("pair__get-sum", {"a": i, "b": 1})
                assert not result.is_error, text_of(result)
                assert text_of(result) == f"The sum of {i} and 1 is {i + 1}.", text_of(result)
        dead = [name for name, r in replicas_of(node, "pair").items() if r["state"] != "healthy" or r["breaker"] != "closed"]
        assert len(dead) == 1, replicas_of(node, "pair")
        assert retries(node, "get-sum") > retries_before, metric_lines(node, "concord_upstream_retries_total")
    finally:
        node.stop()
        for server in servers:
            server.stop()

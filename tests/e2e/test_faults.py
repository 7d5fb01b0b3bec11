"""Faults: upstreams that crash, hang, print garbage, never start, or get killed; shutdown.

Every node here pings its upstreams every 500 ms (health_interval = "500ms").
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import anyio
import pytest
from mcp import MCPError
from mcp.types import ToolListChangedNotification

from conftest import (
    EVERYTHING_JS,
    FIXTURE_BIN,
    NODE_BIN,
    Node,
    NodeFactory,
    ProcIdentity,
    connect,
    descendants,
    eventually,
    fixture_server,
    pid_alive,
    stdio_server,
    text_of,
    tool_names,
)

pytestmark = pytest.mark.anyio

HEALTH = "500ms"
LAUNCHER_SLEEP = 3217  # seconds; also marks the launcher's helper process
RECOVERY_TIMEOUT = 15.0


class ListChangedRecorder:
    """A message handler that timestamps every notifications/tools/list_changed."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def __call__(self, message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            self.times.append(time.monotonic())

    def since(self, moment: float) -> int:
        return sum(1 for t in self.times if t >= moment)


def fx_tools(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("fx__")}


async def fx_pid(client: Any) -> int:
    result = await client.call_tool("fx__stats", {})
    assert not result.is_error, text_of(result)
    return int(result.structured_content["pid"])


async def watch_fx_outage(client: Any, since: float, recorder: ListChangedRecorder) -> dict[str, Any]:
    """Polls tools/list quickly until the fx tools have been seen gone and then back, and the
    client got a list_changed for each transition."""
    seen_gone_at: float | None = None
    back_at: float | None = None
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while time.monotonic() < deadline:
        names = await tool_names(client)
        if seen_gone_at is None:
            if not fx_tools(names):
                seen_gone_at = time.monotonic()
        elif "fx__echo" in names:
            back_at = time.monotonic()
            break
        await anyio.sleep(0.02)
    assert seen_gone_at is not None, "the fx tools never disappeared from tools/list"
    assert back_at is not None, f"the fx tools did not come back within {RECOVERY_TIMEOUT}s"

    # One list_changed when the tools went away, another when they came back.
    async def two_notifications() -> bool:
        return recorder.since(since) >= 2

    await eventually(two_notifications, timeout=5, what="two notifications/tools/list_changed")
    first = min(t for t in recorder.times if t >= since)
    assert first <= back_at, f"no list_changed arrived while the tools were gone: {recorder.times}"
    return {"gone_at": seen_gone_at, "back_at": back_at}


class OtherKeepsWorking:
    """Calls other__echo in a loop while a fault is under way; records every failure."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []

    async def run(self, stop: anyio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                with anyio.fail_after(5):
                    result = await self.client.call_tool("other__echo", {"message": f"ping {n}"})
                if text_of(result) == f"Echo: ping {n}":
                    self.ok += 1
                else:
                    self.failures.append(f"call {n}: {text_of(result)!r}")
            except (MCPError, TimeoutError) as e:
                self.failures.append(f"call {n}: {type(e).__name__}: {e}")
            await anyio.sleep(0.05)


# --------------------------------------------------------------------------------------
# A node whose fx upstream gets crashed and killed
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restart_node(concord: NodeFactory):
    node = concord.start(
        "restarts",
        {
            "fx": fixture_server("fx"),
            "other": fixture_server("other"),
            # A launcher (like npx or uvx): the shell starts a helper in the background,
            # then becomes the server itself.
            "wrapped": stdio_server("sh", "-c", f"sleep {LAUNCHER_SLEEP} & exec {FIXTURE_BIN} --name wrapped"),
        },
        health_interval=HEALTH,
    )
    yield node
    node.stop()


async def test_upstream_crash_mid_call_recovers(restart_node: Node) -> None:
    recorder = ListChangedRecorder()
    async with connect(restart_node.url, message_handler=recorder) as client, connect(restart_node.url) as other:
        names = await tool_names(client)
        assert {"fx__echo", "other__echo"} <= names
        old_pid = await fx_pid(client)
        restarts_before = restart_node.server_status("fx")["restarts"]

        keeper = OtherKeepsWorking(other)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeper.run, stop)
            crashed_at = time.monotonic()
            with pytest.raises(MCPError) as caught:
                with anyio.fail_after(10):
                    await client.call_tool("fx__crash", {})
            with anyio.fail_after(RECOVERY_TIMEOUT + 10):
                await watch_fx_outage(client, crashed_at, recorder)
            stop.set()

        error = caught.value
        assert "'fx'" in error.message, error.message
        assert error.code == -32012, f"{error.code}: {error.message}"

        result = await client.call_tool("fx__echo", {"message": "back"})
        assert text_of(result) == "Echo: back"
        new_pid = await fx_pid(client)
        assert new_pid != old_pid
        assert not pid_alive(old_pid)
        assert restart_node.server_status("fx")["restarts"] > restarts_before
        assert restart_node.server_status("fx")["state"] == "healthy"

    assert keeper.failures == [], keeper.failures
    assert keeper.ok > 0


async def test_upstream_killed_from_outside_is_restarted(restart_node: Node) -> None:
    recorder = ListChangedRecorder()
    async with connect(restart_node.url, message_handler=recorder) as client:
        # Recover from any earlier test first.
        await eventually(lambda: _has(client, "fx__echo"), timeout=RECOVERY_TIMEOUT, what="fx tools")
        old_pid = await fx_pid(client)
        old = ProcIdentity.of(old_pid)
        assert old is not None and "concord-fixture" in old.cmd, old

        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        with anyio.fail_after(RECOVERY_TIMEOUT + 10):
            await watch_fx_outage(client, killed_at, recorder)

        new_pid = await fx_pid(client)
        assert new_pid != old_pid
        assert not old.alive()
        result = await client.call_tool("fx__echo", {"message": "after kill -9"})
        assert text_of(result) == "Echo: after kill -9"
        result = await client.call_tool("other__echo", {"message": "unaffected"})
        assert text_of(result) == "Echo: unaffected"


async def test_launcher_helpers_do_not_outlive_a_restart(restart_node: Node) -> None:
    """When a launched server dies, the rest of its process group goes with it."""
    async with connect(restart_node.url) as client:
        result = await client.call_tool("wrapped__stats", {})
        leader = int(result.structured_content["pid"])
        helpers = {p for p in descendants(leader) if f"sleep {LAUNCHER_SLEEP}" in p.cmd}
        assert helpers, f"the launcher's helper is not running under {leader}: {descendants(leader)}"

        os.kill(leader, signal.SIGKILL)

        async def restarted() -> bool:
            if "wrapped__stats" not in await tool_names(client):
                return False
            result = await client.call_tool("wrapped__stats", {})
            return not result.is_error and int(result.structured_content["pid"]) != leader

        await eventually(restarted, timeout=RECOVERY_TIMEOUT, what="wrapped to be restarted")
        orphans = [p for p in helpers if p.alive()]
        assert not orphans, f"helpers of the dead server were left running: {orphans}"


async def _has(client: Any, name: str) -> bool:
    return name in await tool_names(client)


# --------------------------------------------------------------------------------------
# A node with a hanging upstream, a garbage-printing one, and one that never starts
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_node(concord: NodeFactory):
    node = concord.start(
        "faulty",
        {
            "fx": fixture_server("fx", timeout="1s"),
            # Hangs here are ended by the client, never by a timeout (see the test below).
            "stuck": fixture_server("stuck", timeout="600s"),
            "other": fixture_server("other"),
            "garbled": fixture_server("garbled", "--garbage"),
            "dead": stdio_server("/nonexistent/concord-e2e-no-such-server", "--stdio"),
        },
        health_interval=HEALTH,
    )
    yield node
    node.stop()


async def stats_of(client: Any, server: str) -> dict[str, Any]:
    """The fixture `server`'s own counters (its `stats` tool): calls, cancelled request ids."""
    result = await client.call_tool(f"{server}__stats", {})
    assert not result.is_error, text_of(result)
    return result.structured_content


async def wait_for_call_to_arrive(client: Any, server: str, before: dict[str, Any]) -> None:
    """Waits until the fixture `server` has received one tools/call more than `before` counted,
    besides the stats calls this makes itself (each of them counts too)."""
    polls = 0

    async def arrived() -> bool:
        nonlocal polls
        polls += 1
        stats = await stats_of(client, server)
        return stats["calls"] - before["calls"] - polls >= 1

    await eventually(arrived, timeout=15, what=f"the call to reach {server}")


async def wait_for_cancellation(client: Any, server: str, before: dict[str, Any]) -> dict[str, Any]:
    """Waits until the fixture `server` has received one notifications/cancelled more than in
    `before`; returns its stats then."""

    async def cancelled() -> dict[str, Any] | None:
        stats = await stats_of(client, server)
        return stats if len(stats["cancelled"]) > len(before["cancelled"]) else None

    stats = await eventually(cancelled, timeout=15, what=f"{server} to get notifications/cancelled")
    assert len(stats["cancelled"]) == len(before["cancelled"]) + 1, stats
    return stats


async def test_hanging_upstream_is_cut_by_its_timeout(faulty_node: Node) -> None:
    async with connect(faulty_node.url) as client, connect(faulty_node.url) as observer:
        before = await stats_of(observer, "fx")
        with anyio.fail_after(30):
            with pytest.raises(MCPError) as caught:
                await client.call_tool("fx__hang", {})
        # The gateway gave up on the upstream's behalf and told it so: fx saw the call arrive
        # and then a notifications/cancelled for it.
        await wait_for_cancellation(observer, "fx", before)
        after = await stats_of(observer, "fx")
        # fx__hang, then the polls of wait_for_cancellation and this one: the hang did arrive.
        assert after["calls"] > before["calls"] + 1, (before, after)

    error = caught.value
    assert error.code == -32011, f"{error.code}: {error.message}"
    assert error.message.startswith("server 'fx' did not answer tools/call within "), error.message
    assert error.message.endswith((" 1.0 s", " 1s")), error.message
    assert error.data == {"server": "fx", "timeoutMs": 1000}, error.data


async def test_a_hanging_call_blocks_no_other_call(faulty_node: Node) -> None:
    """While a call hangs on `stuck` (whose timeout is far away), calls to other servers and to
    `stuck` itself, from another client and from the same one, are answered; only then does the
    client give up on the hanging call, and `stuck` hears of it."""
    outcome: dict[str, Any] = {}
    async with connect(faulty_node.url) as client, connect(faulty_node.url) as second:
        before = await stats_of(second, "stuck")
        scope = anyio.CancelScope()

        async def hang() -> None:
            with scope:
                try:
                    outcome["hang"] = await client.call_tool("stuck__hang", {})
                except MCPError as e:
                    outcome["hang"] = e

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hang)
                await wait_for_call_to_arrive(second, "stuck", before)
                other = await second.call_tool("other__echo", {"message": "not blocked"})
                same_server = await second.call_tool("stuck__echo", {"message": "beside the hang"})
                same_client = await client.call_tool("other__echo", {"message": "same client"})
                # All three answered while stuck__hang was still waiting for its answer.
                assert "hang" not in outcome, outcome
                before_cancel = await stats_of(second, "stuck")
                scope.cancel()  # the SDK sends notifications/cancelled for stuck__hang
            await wait_for_cancellation(second, "stuck", before_cancel)

    assert scope.cancelled_caught and "hang" not in outcome, outcome
    assert text_of(other) == "Echo: not blocked"
    assert text_of(same_server) == "Echo: beside the hang"
    assert text_of(same_client) == "Echo: same client"


async def test_garbage_on_stdout_is_tolerated(faulty_node: Node) -> None:
    assert faulty_node.server_status("garbled")["state"] == "healthy"
    async with connect(faulty_node.url) as client:
        assert "garbled__echo" in await tool_names(client)
        result = await client.call_tool("garbled__echo", {"message": "through the noise"})
        assert text_of(result) == "Echo: through the noise"
        assert result.structured_content == {"echo": "through the noise"}


async def test_dead_upstream_at_start(faulty_node: Node) -> None:
    status, body = faulty_node.readyz()
    assert status == 200 and body["ready"] is True
    dead = faulty_node.server_status("dead")
    assert dead["state"] == "unhealthy", dead
    assert dead.get("reason"), dead
    assert dead["tools"] == 0, dead

    async with connect(faulty_node.url) as client:
        names = await tool_names(client)
        assert not {n for n in names if n.startswith("dead__")}
        assert "other__echo" in names
        result = await client.call_tool("other__echo", {"message": "alive"})
        assert text_of(result) == "Echo: alive"

        with pytest.raises(MCPError) as caught:
            await client.call_tool("dead__anything", {})
    assert "'dead'" in caught.value.message, caught.value.message
    assert caught.value.code == -32010, f"{caught.value.code}: {caught.value.message}"


# --------------------------------------------------------------------------------------
# Shutdown
# --------------------------------------------------------------------------------------


async def test_sigterm_leaves_no_upstream_process(concord: NodeFactory) -> None:
    node = concord.start(
        "shutdown",
        {
            "fx": fixture_server("fx"),
            "everything": stdio_server(NODE_BIN, EVERYTHING_JS, "stdio"),
            "wrapped": stdio_server("sh", "-c", f"sleep {LAUNCHER_SLEEP} & exec {FIXTURE_BIN} --name wrapped"),
        },
        health_interval=HEALTH,
    )
    async with connect(node.url) as client:
        fx = ProcIdentity.of(await fx_pid(client))
    assert fx is not None and fx.alive()
    children = node.upstream_processes()
    assert fx in children, (fx, children)
    assert any("server-everything" in p.cmd for p in children), children
    assert any(f"sleep {LAUNCHER_SLEEP}" in p.cmd for p in children), children

    node.stop()  # SIGTERM; asserts exit within 10 s and that no child survives

    assert node.proc.returncode == 0
    assert not fx.alive()
    assert not any(p.alive() for p in children), [p for p in children if p.alive()]

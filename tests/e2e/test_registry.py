"""The mesh registry over plain HTTP, as any language would use it: registering real MCP servers
(the endpoint is probed with an MCP handshake), heartbeats, expiry, deregistration, resolution
with ranked candidates and reasons (REST and `concord tools resolve`), bad registrations refused
with the catalog unchanged, and registrations that survive a node restart."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from conftest import CONCORD_BIN, FIXTURE_BIN, NodeFactory, PeerServer, _LIVE_LOGS, free_port, wait_until

pytestmark = pytest.mark.anyio


def request(method: str, url: str, body: Any | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, text.decode()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PeerServer]]:
    """Two concord-fixture MCP servers over streamable HTTP."""
    servers = []
    for index in range(2):
        port = free_port()
        log_path = tmp_path_factory.mktemp(f"replica-{index}") / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(FIXTURE_BIN), "--name", f"search{index}", "--http", f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = PeerServer(f"replica {index}", proc, port, log_path)
        _LIVE_LOGS[server.label] = log_path

        def accepting(port: int = port) -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_until(accepting, timeout=30, what=f"replica {index}")
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


def registration(name: str, version: str, port: int, tags: list[str], **extra: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "version": version,
        "kind": "server",
        "capabilities": ["search"],
        "tags": tags,
        "endpoint": {"url": f"http://127.0.0.1:{port}/mcp"},
    }
    body.update(extra)
    return body


def api(node: Any) -> str:
    return node.url.removesuffix("/mcp") + "/api/v1/registry"


def concord_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs `concord ARGS`; killed after 60 s, so a CLI that hangs fails the test."""
    return subprocess.run([str(CONCORD_BIN), *args], capture_output=True, text=True, timeout=60)


# Long enough that no registration of these tests expires while it is being checked; expiry
# itself is shown by registering again with a short TTL (same entity: same id) and waiting.
LIVE_TTL = 600


def test_register_heartbeat_resolve_expire_and_deregister(concord: NodeFactory, replicas: list[PeerServer]) -> None:
    directory = concord.new_dir("registry")
    node = concord.start("registry", {}, directory=directory)
    try:
        status, first = request("POST", api(node), registration("search", "1.4.2", replicas[0].port, ["prod"]))
        assert status == 201, first
        status, second = request(
            "POST", api(node), registration("search", "1.6.0", replicas[1].port, ["prod", "gpu"], ttl_seconds=LIVE_TTL)
        )
        assert status == 201, second

        # Bad registrations: clear errors, nothing stored.
        status, body = request("POST", api(node), registration("search", "one point two", replicas[0].port, []))
        assert status == 400 and body["error"].startswith("version:"), body
        status, body = request("POST", api(node), {**registration("x", "1.0.0", replicas[0].port, []), "colour": "red"})
        assert status == 400 and "unknown field `colour`" in str(body), body
        dead = free_port()
        status, body = request("POST", api(node), registration("ghost", "1.0.0", dead, []))
        assert status == 422 and "does not speak MCP" in body["error"], body
        status, body = request(
            "POST", api(node), {**registration("web", "1.0.0", 0, []), "endpoint": {"url": node.url.removesuffix("/mcp") + "/healthz"}}
        )
        assert status == 422, body
        status, listed = request("GET", api(node))
        assert sorted(e["version"] for e in listed["entities"]) == ["1.4.2", "1.6.0"]

        # Resolution over REST: ranked, with reasons.
        status, resolution = request("GET", api(node) + "/resolve?capability=search&tags=prod,%2Bgpu&version=%5E1.4")
        assert status == 200, resolution
        assert [c["version"] for c in resolution["candidates"]] == ["1.6.0", "1.4.2"]
        assert "has preferred tag gpu (+10)" in resolution["candidates"][0]["reasons"]
        status, body = request("GET", api(node) + "/resolve?capability=search&version=not-a-range")
        assert status == 400 and body["error"].startswith("version:"), body

        # The same through the CLI.
        cli = concord_cli("tools", "resolve", "--capability", "search", "--tags", "prod,+gpu,-staging", "--url", node.url)
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        assert lines and lines[0].startswith("1. search 1.6.0 (score 110, healthy)"), cli.stdout
        agents = concord_cli("agents", "list", "--url", node.url)
        assert agents.returncode == 0 and agents.stdout.count("search\t") == 2, agents.stdout + agents.stderr

        # Heartbeats keep an entity alive; without them it expires and resolution says why.
        status, beat = request("POST", f"{api(node)}/{first['id']}/heartbeat", {"health": "degraded"})
        assert status == 200 and beat["status"] == "degraded", beat
        status, body = request("POST", f"{api(node)}/no-such-id/heartbeat", {})
        assert status == 404, body
        # 1.6.0 registers again (the same entity) with a TTL of 1 s and sends no heartbeat.
        status, again = request(
            "POST", api(node), registration("search", "1.6.0", replicas[1].port, ["prod", "gpu"], ttl_seconds=1)
        )
        assert status == 201 and again["id"] == second["id"] and again["ttl_seconds"] == 1, again

        def expired_and_degraded() -> dict[str, Any] | None:
            status, resolution = request("GET", api(node) + "/resolve?capability=search")
            assert status == 200, resolution
            rejected = {r["version"] for r in resolution["rejected"]}
            degraded = [c["status"] for c in resolution["candidates"]] == ["degraded"]
            return resolution if "1.6.0" in rejected and degraded else None

        resolution = wait_until(
            expired_and_degraded, timeout=20, interval=0.1, what="1.6.0 to expire and 1.4.2's heartbeat to land"
        )
        assert [c["version"] for c in resolution["candidates"]] == ["1.4.2"], resolution
        expired = [r for r in resolution["rejected"] if r["version"] == "1.6.0"][0]
        assert "expired: no heartbeat for more than 1 s" in expired["reasons"], expired

        # Declared dependencies, resolved now.
        planner = registration(
            "planner",
            "0.3.0",
            replicas[1].port,
            [],
            dependencies={"search": {"capability": "search", "tags": ["prod"]}, "llm": {"capability": "llm"}},
        )
        status, body = request("POST", api(node), planner)
        assert status == 201, body
        deps = concord_cli("deps", "show", "planner", "--url", node.url)
        assert deps.returncode == 1, deps.stdout + deps.stderr
        assert "search: search 1.4.2 (score 70, degraded)" in deps.stdout, deps.stdout
        assert "llm: nothing resolves" in deps.stdout and "lack capability llm" in deps.stdout, deps.stdout
        status, _ = request("DELETE", f"{api(node)}/{body['id']}")
        assert status == 200

        # A restart keeps the catalog.
        node.stop()
        node = concord.start("registry-again", {}, directory=directory)
        status, listed = request("GET", api(node))
        assert sorted(e["version"] for e in listed["entities"]) == ["1.4.2", "1.6.0"], listed

        status, gone = request("DELETE", f"{api(node)}/{first['id']}")
        assert status == 200 and gone["deregistered"] is True
        status, body = request("DELETE", f"{api(node)}/{first['id']}")
        assert status == 404
        status, listed = request("GET", api(node))
        assert [e["version"] for e in listed["entities"]] == ["1.6.0"]
    finally:
        node.stop()


async def test_a_registered_server_joins_the_namespace_and_leaves_when_it_expires(
    concord: NodeFactory, replicas: list[PeerServer]
) -> None:
    from mcp.types import ToolListChangedNotification

    from conftest import connect, eventually, text_of, tool_names

    node = concord.start("registry-routing", {})
    try:
        notifications: list[Any] = []

        async def on_message(message: Any) -> None:
            notifications.append(message)

        async with connect(node.url, message_handler=on_message) as client:
            assert "finder__echo" not in await tool_names(client)
            status, entity = request(
                "POST", api(node), registration("finder", "2.0.0", replicas[0].port, ["prod"], ttl_seconds=LIVE_TTL)
            )
            assert status == 201, entity

            async def announced() -> bool:
                return any(isinstance(m, ToolListChangedNotification) for m in notifications)

            await eventually(announced, timeout=10, what="list_changed after the registration")
            assert "finder__echo" in await tool_names(client)
            assert text_of(await client.call_tool("finder__echo", {"message": "via the mesh"})) == "Echo: via the mesh"

            # It registers again (the same entity) with a TTL of 1 s and stops heartbeating: once
            # that passes it leaves, and the client hears of it. (A new TTL changes nothing the
            # gateway routes, so the registration itself announces nothing.)
            notifications.clear()
            status, again = request(
                "POST", api(node), registration("finder", "2.0.0", replicas[0].port, ["prod"], ttl_seconds=1)
            )
            assert status == 201 and again["id"] == entity["id"], again

            async def gone() -> bool:
                return "finder__echo" not in await tool_names(client)

            await eventually(gone, timeout=20, what="finder__echo to leave after the expiry")
            await eventually(announced, timeout=10, what="list_changed after the expiry")
            status, listed = request("GET", api(node))
            assert [(e["name"], e["status"]) for e in listed["entities"]] == [("finder", "expired")], listed
    finally:
        node.stop()


async def test_entities_declared_in_the_config_are_registered_and_kept_alive(
    concord: NodeFactory, replicas: list[PeerServer]
) -> None:
    from conftest import connect, eventually, tool_names

    extra = f"""
[registry.configured]
version = "3.0.0"
kind = "server"
capabilities = ["search"]
tags = ["static"]
ttl_seconds = 1
endpoint = {{ url = "http://127.0.0.1:{replicas[1].port}/mcp" }}
"""
    node = concord.start("registry-config", {}, extra_config=extra)
    try:
        async with connect(node.url) as client:

            async def routed() -> bool:
                return "configured__echo" in await tool_names(client)

            await eventually(routed, timeout=10, what="the configured entity's tools")
            # Its TTL is 1 s, but the node keeps it alive itself: wait until the node reports it
            # registered for three TTLs, and heartbeated since it was first seen.
            status, listed = request("GET", api(node))
            assert status == 200, listed
            first_beat = listed["entities"][0]["last_heartbeat_ms"]

            def outlived_its_ttl() -> dict[str, Any] | None:
                status, listed = request("GET", api(node))
                assert status == 200, listed
                entity = listed["entities"][0]
                return listed if entity["uptime_seconds"] >= 3 and entity["last_heartbeat_ms"] > first_beat else None

            listed = wait_until(outlived_its_ttl, timeout=30, interval=0.2, what="the entity to outlive its TTL of 1 s")
            assert [(e["name"], e["status"]) for e in listed["entities"]] == [("configured", "healthy")], listed
            assert await routed()
    finally:
        node.stop()

"""Roots through the gateway: with `forward_roots = true`, an upstream's `roots/list` made while
serving a call is answered with the roots of the client that made that call, never another
client's; a 2026-07-28 client answers it through an `input_required` round trip. Without the
setting, the upstream is not told the gateway has roots at all.

Upstream: Concord's conformance fixture (`test_list_roots` asks for roots mid-call), over
streamable HTTP so that two calls can be in flight at once.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import anyio
import pytest
from mcp import Client
from mcp.types import ListRootsResult, Root

from conftest import (
    REPO,
    NodeFactory,
    PeerServer,
    Rendezvous,
    _LIVE_LOGS,
    connect,
    free_port,
    stdio_server,
    text_of,
    wait_until,
)

pytestmark = pytest.mark.anyio

CONFORMANCE_FIXTURE_BIN = REPO / "target" / "debug" / "concord-conformance-fixture"


@pytest.fixture(scope="module")
def fixture_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerServer]:
    directory: Path = tmp_path_factory.mktemp("conformance-fixture-http")
    port = free_port()
    log_path = directory / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(CONFORMANCE_FIXTURE_BIN), "--http", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    label = f"conformance fixture :{port}"
    server = PeerServer(label, proc, port, log_path)
    _LIVE_LOGS[label] = log_path

    def accepting() -> bool:
        assert proc.poll() is None, f"{label} exited with {proc.returncode}"
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(accepting, timeout=30, interval=0.1, what=f"{label} to listen")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(concord: NodeFactory, fixture_http: PeerServer):
    node = concord.start(
        "roots",
        {
            "cf": {"url": f"http://127.0.0.1:{fixture_http.port}/mcp", "forward_roots": True},
            "quiet": stdio_server(CONFORMANCE_FIXTURE_BIN),
        },
    )
    yield node
    node.stop()


def roots_of(name: str, asked: list[str], rendezvous: Rendezvous | None = None) -> Any:
    async def list_roots(context: Any) -> ListRootsResult:
        asked.append(name)
        if rendezvous is not None:
            await rendezvous.wait()
        return ListRootsResult(roots=[Root(uri=f"file:///work/{name}", name=f"{name}'s project")])

    return list_roots


async def test_each_client_answers_only_its_own_calls_roots_request(node: Any) -> None:
    asked: list[str] = []
    results: dict[str, Any] = {}
    # Neither answers before both have been asked: the two requests overlap at the gateway.
    both = Rendezvous(2)

    async def call(name: str) -> None:
        async with connect(node.url, list_roots_callback=roots_of(name, asked, both)) as client:
            results[name] = await client.call_tool("cf__test_list_roots", {})

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(call, "alice")
            group.start_soon(call, "bob")

    for name in ("alice", "bob"):
        assert not results[name].is_error, f"{name}: {text_of(results[name])}"
    assert both.everyone.is_set(), "the two roots/list requests were never in flight together"
    assert sorted(asked) == ["alice", "bob"], asked
    for name in ("alice", "bob"):
        result = results[name]
        roots = result.structured_content["roots"]
        assert [r["uri"] for r in roots] == [f"file:///work/{name}"], roots


async def test_a_client_without_roots_gets_a_clear_refusal(node: Any) -> None:
    async with connect(node.url) as client:
        result = await client.call_tool("cf__test_list_roots", {})
    assert result.is_error
    assert "does not support roots/list" in text_of(result), text_of(result)


async def test_roots_are_not_declared_to_an_upstream_without_the_setting(node: Any) -> None:
    asked: list[str] = []
    async with connect(node.url, list_roots_callback=roots_of("carol", asked)) as client:
        result = await client.call_tool("quiet__test_list_roots", {})
    assert result.is_error
    assert "does not support roots" in text_of(result), text_of(result)
    assert asked == []


async def test_a_2026_client_answers_roots_through_input_required(node: Any) -> None:
    asked: list[str] = []
    async with Client(node.url, cache=None, list_roots_callback=roots_of("dave", asked)) as modern:
        assert modern.protocol_version == "2026-07-28"
        result = await modern.call_tool("cf__test_list_roots", {})
    assert asked == ["dave"]
    assert not result.is_error, text_of(result)
    assert [r["uri"] for r in result.structured_content["roots"]] == ["file:///work/dave"]

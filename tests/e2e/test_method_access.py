"""Every MCP method decided by the policy, on a real node with auth on, attacked through the
official Python SDK by principals who may use little or nothing of server `a`:

- alice may do everything (the rule `principal.id == "alice"`);
- mallory may call one tool of server `b` (`b__echo`) and nothing else;
- eve may ask for log lines (`logging/setLevel`) and call `b__log`;
- trent may open a `subscriptions/listen` stream and read `fixture://a/items/1` only;
- oscar may call `b__log` and nothing else (no `logging/setLevel`).

Each test reproduces one attack of the security issue and asserts that it fails now:
completion as an existence oracle, resource templates of a server one may not use, log lines
of such a server, a listen stream carrying updates of resources one may not read, and a hidden
tool of a stopped upstream that says "unavailable" instead of "unknown". Absence is proven
with a marker that must arrive after whatever should not have, never with a pause.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.subscriptions import ResourceUpdated
from mcp.types import PromptReference, ResourceTemplateReference

from conftest import (
    FIXTURE_BIN,
    NodeFactory,
    eventually,
    fixture_server,
    free_port,
    text_of,
    tool_names,
    wait_until,
)

pytestmark = [
    pytest.mark.anyio,
    # logging/setLevel is what 2025-era clients send; the SDK warns that 2026-07-28 dropped it.
    pytest.mark.filterwarnings("ignore:The logging capability is deprecated"),
]

SECRET = "method-access-secret-method-access-secret"
ISSUER = "https://idp.method-access.test"
AUDIENCE = "concord-method-access"
FORBIDDEN = -32003
UNAVAILABLE = -32010
WAIT = 15  # seconds any awaited event may take before the test fails

POLICY = """
[[rules]]
name = "alice-everything"
effect = "allow"
when = 'principal.id == "alice"'

[[rules]]
name = "mallory-one-tool-of-b"
effect = "allow"
when = 'principal.id == "mallory" && method == "tools/call" && tool == "b__echo"'

[[rules]]
name = "eve-logs-and-one-tool-of-b"
effect = "allow"
when = 'principal.id == "eve" && (method == "logging/setLevel" || (method == "tools/call" && tool == "b__log"))'

[[rules]]
name = "trent-listens-to-one-item-of-a"
effect = "allow"
when = 'principal.id == "trent" && (method == "subscriptions/listen" || (method == "resources/read" && name == "fixture://a/items/1"))'

[[rules]]
name = "oscar-one-logging-tool-of-b"
effect = "allow"
when = 'principal.id == "oscar" && method == "tools/call" && tool == "b__log"'
"""

AUTH_CONFIG = f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
authorization_servers = ["{ISSUER}"]
leeway = "5s"
[[auth.keys]]
kid = "ma"
algorithm = "HS256"
secret = "{SECRET}"

[policy]
file = "policy.toml"
"""


# --------------------------------------------------------------------------------------
# Tokens and clients
# --------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_for(sub: str) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ma"}).encode())
    claims = {"sub": sub, "roles": [], "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    body = _b64url(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


@asynccontextmanager
async def as_principal(url: str, sub: str, *, mode: str = "legacy", **kwargs: Any) -> AsyncIterator[Client]:
    """An SDK client of `url` that sends `sub`'s bearer token; `mode="auto"` negotiates the
    2026-07-28 protocol. An assertion failing inside surfaces as itself, not wrapped in the
    SDK's exception group."""
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token_for(sub)}"})
    try:
        async with http, Client(streamable_http_client(url, http_client=http), mode=mode, cache=None, **kwargs) as client:
            yield client
    except BaseExceptionGroup as group:
        sole = _sole(group)
        if sole is None:
            raise
        raise sole from None


def _sole(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside (nested) single-member groups (a pytest failure included)."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return None if isinstance(group, BaseExceptionGroup) else group


class Inbox:
    """What a callback or a stream received, in arrival order; `until` waits (without pauses)
    for something to arrive that satisfies a predicate."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = anyio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def callback(self, item: Any) -> None:
        self.add(item)

    async def until(self, predicate: Callable[[Any], bool], what: str) -> Any:
        with anyio.move_on_after(WAIT):
            while True:
                changed = self._changed
                for item in self.items:
                    if predicate(item):
                        return item
                await changed.wait()
        raise AssertionError(f"never received {what} within {WAIT} s; received: {self.items}")


def same_answer(hidden: MCPError, hidden_name: str, unknown: MCPError, unknown_name: str) -> None:
    """The hidden item's error is the unknown item's error, names aside."""
    assert hidden.error.code == unknown.error.code, (hidden.error, unknown.error)
    assert hidden.error.message.replace(hidden_name, "NAME") == unknown.error.message.replace(unknown_name, "NAME"), (
        hidden.error,
        unknown.error,
    )
    assert json.dumps(hidden.error.data).replace(hidden_name, "NAME") == json.dumps(unknown.error.data).replace(
        unknown_name, "NAME"
    ), (hidden.error, unknown.error)


async def error_of(call: Awaitable[Any]) -> MCPError:
    with pytest.raises(MCPError) as caught:
        await call
    return caught.value


# --------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------


def _start(concord: NodeFactory, label: str, servers: dict[str, dict[str, Any]]) -> Any:
    directory = concord.new_dir(label)
    (directory / "policy.toml").write_text(POLICY)
    return concord.start(label, servers, directory=directory, extra_config=AUTH_CONFIG)


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    node = _start(concord, "method-access", {"a": fixture_server("a"), "b": fixture_server("b")})
    yield node
    node.stop()


class HttpFixture:
    """`concord-fixture --http` on a free port, started by the test so that the test can stop it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.port = free_port()
        self.log_path = directory / f"{name}-http.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(FIXTURE_BIN), "--name", name, "--http", f"127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,
            )

        def accepting() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the HTTP fixture exited with {self.proc.returncode}: {self.log_path.read_text()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        try:
            wait_until(accepting, timeout=30, interval=0.05, what=f"the HTTP fixture to listen on {self.port}")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def down_node(concord: NodeFactory, tmp_path_factory: pytest.TempPathFactory):
    """A node whose server `a` is an HTTP fixture the test stops, beside a stdio `b`."""
    upstream = HttpFixture(tmp_path_factory.mktemp("method-access-http-a"), "a")
    try:
        node = _start(concord, "method-access-down", {"a": {"url": upstream.url}, "b": fixture_server("b")})
    except BaseException:
        upstream.stop()
        raise
    try:
        yield node, upstream
    finally:
        upstream.stop()
        node.stop()


# --------------------------------------------------------------------------------------
# 1. completion/complete is no existence oracle
# --------------------------------------------------------------------------------------


async def test_completion_of_a_hidden_prompt_or_template_answers_like_a_nonexistent_one(node: Any) -> None:
    async with as_principal(node.url, "alice") as alice, as_principal(node.url, "mallory") as mallory:
        # Mallory's token works: her one tool answers.
        assert text_of(await mallory.call_tool("b__echo", {"message": "hi"})) == "Echo: hi"

        # Alice completes her prompt and her template.
        by_prompt = await alice.complete(PromptReference(type="ref/prompt", name="a__greet"), {"name": "who", "value": "A"})
        assert by_prompt.completion.values == ["a-Ada", "a-Alan"]
        by_template = await alice.complete(
            ResourceTemplateReference(type="ref/resource", uri="fixture://a/items/{id}"), {"name": "id", "value": "G"}
        )
        assert by_template.completion.values == ["a-Grace"]

        # Mallory gets, for alice's prompt, exactly what a prompt that exists nowhere gets.
        hidden = await error_of(
            mallory.complete(PromptReference(type="ref/prompt", name="a__greet"), {"name": "who", "value": "A"})
        )
        unknown = await error_of(
            mallory.complete(PromptReference(type="ref/prompt", name="a__no_such_prompt"), {"name": "who", "value": "A"})
        )
        assert "unknown prompt" in unknown.error.message, unknown.error
        same_answer(hidden, "a__greet", unknown, "a__no_such_prompt")
        # ...and the same as alice gets for the nonexistent prompt: the answer depends on nothing
        # but the name.
        alice_unknown = await error_of(
            alice.complete(PromptReference(type="ref/prompt", name="a__no_such_prompt"), {"name": "who", "value": "A"})
        )
        same_answer(hidden, "a__greet", alice_unknown, "a__no_such_prompt")

        # The same for a resource template of server a.
        hidden_template = await error_of(
            mallory.complete(
                ResourceTemplateReference(type="ref/resource", uri="fixture://a/items/{id}"), {"name": "id", "value": "G"}
            )
        )
        unknown_template = await error_of(
            mallory.complete(
                ResourceTemplateReference(type="ref/resource", uri="fixture://nobody/items/{id}"),
                {"name": "id", "value": "G"},
            )
        )
        assert "unknown resource" in unknown_template.error.message, unknown_template.error
        same_answer(hidden_template, "fixture://a/items/{id}", unknown_template, "fixture://nobody/items/{id}")

        # Being allowed one tool of b does not open b's prompt to completion either.
        hidden_b = await error_of(
            mallory.complete(PromptReference(type="ref/prompt", name="b__greet"), {"name": "who", "value": "A"})
        )
        same_answer(hidden_b, "b__greet", unknown, "a__no_such_prompt")


# --------------------------------------------------------------------------------------
# 2. resources/templates/list shows only what the caller may read
# --------------------------------------------------------------------------------------


async def test_resource_templates_of_a_server_one_may_not_use_are_not_listed(node: Any) -> None:
    async with as_principal(node.url, "alice") as alice, as_principal(node.url, "mallory") as mallory:
        alice_templates = {t.uri_template for t in (await alice.list_resource_templates()).resource_templates}
        assert {"fixture://a/items/{id}", "fixture://b/items/{id}"} <= alice_templates, alice_templates

        mallory_templates = {t.uri_template for t in (await mallory.list_resource_templates()).resource_templates}
        assert "fixture://a/items/{id}" not in mallory_templates, mallory_templates
        assert mallory_templates == set(), "mallory may read no resource at all, so she sees no template"

        # The concrete resources likewise, and mallory's tool list is her one tool.
        alice_resources = {r.uri for r in (await alice.list_resources()).resources}
        assert "fixture://a/info" in alice_resources, alice_resources
        assert {r.uri for r in (await mallory.list_resources()).resources} == set()
        # (concord__result_page only ever opens one's own truncated results.)
        assert await tool_names(mallory) - {"concord__result_page"} == {"b__echo"}

        # Reading through a's template answers mallory like a resource nobody serves.
        hidden = await error_of(mallory.read_resource("fixture://a/items/1"))
        unknown = await error_of(mallory.read_resource("fixture://nobody/items/1"))
        same_answer(hidden, "fixture://a/items/1", unknown, "fixture://nobody/items/1")
        assert (await alice.read_resource("fixture://a/items/1")).contents[0].text == "a served fixture://a/items/1"


# --------------------------------------------------------------------------------------
# 3. logging/setLevel is decided, and log lines reach only sessions that may use the server
# --------------------------------------------------------------------------------------


async def test_log_lines_reach_only_sessions_that_may_use_their_server(node: Any) -> None:
    eve_logs, alice_logs, mallory_logs = Inbox(), Inbox(), Inbox()
    # Eve connects first: the node sends a log line to its sessions in the order they
    # connected, so had eve been sent a's line, it would be on her stream before anything the
    # node sends her after alice has received that line.
    async with (
        as_principal(node.url, "eve", logging_callback=eve_logs.callback) as eve,
        as_principal(node.url, "alice", logging_callback=alice_logs.callback) as alice,
        as_principal(node.url, "mallory", logging_callback=mallory_logs.callback) as mallory,
    ):
        refused = await error_of(mallory.set_logging_level("debug"))
        assert refused.error.code == FORBIDDEN, refused.error
        assert refused.error.message == "forbidden: the policy does not allow logging/setLevel", refused.error

        await eve.set_logging_level("debug")
        await alice.set_logging_level("debug")

        secret = "a's private log line"
        assert text_of(await alice.call_tool("a__log", {"message": secret})) == "logged"
        line = await alice_logs.until(lambda p: p.data == secret, "a's log line at alice")
        assert (line.level, line.logger) == ("warning", "a"), line

        marker = "b's marker log line"
        assert text_of(await eve.call_tool("b__log", {"message": marker})) == "logged"
        await eve_logs.until(lambda p: p.data == marker, "b's marker log line at eve")
        assert [(p.level, p.logger, p.data) for p in eve_logs.items] == [("warning", "b", marker)], (
            "eve may use b but not a: she hears b's line and nothing of a's"
        )
        # Alice may use b as well: she hears the marker too, after a's line.
        await alice_logs.until(lambda p: p.data == marker, "b's marker log line at alice")
        assert [p.data for p in alice_logs.items] == [secret, marker], alice_logs.items

        # Eve's session is no wider than her principal: calling a's tool is still unknown to her.
        hidden = await error_of(eve.call_tool("a__log", {"message": "x"}))
        unknown = await error_of(eve.call_tool("a__no_such_tool", {}))
        same_answer(hidden, "a__log", unknown, "a__no_such_tool")


async def test_a_per_request_log_level_needs_the_logging_rule_too(node: Any) -> None:
    heard = Inbox()
    async with as_principal(node.url, "oscar") as legacy:
        refused = await error_of(legacy.set_logging_level("warning"))
        assert refused.error.code == FORBIDDEN, refused.error
    async with as_principal(
        node.url, "oscar", mode="auto", log_level="warning", logging_callback=heard.callback
    ) as modern:
        assert modern.protocol_version == "2026-07-28", modern.protocol_version
        assert text_of(await modern.call_tool("b__log", {"message": "oscar never got the logging rule"})) == "logged"
    # A call's log lines travel on its own response stream, ahead of its result: by now they
    # would be here.
    assert heard.items == [], heard.items


# --------------------------------------------------------------------------------------
# 4. subscriptions/listen is decided, and carries only updates of readable resources
# --------------------------------------------------------------------------------------


async def test_listen_is_refused_without_the_rule_and_carries_only_readable_resources(node: Any) -> None:
    info, item = "fixture://a/info", "fixture://a/items/1"
    nowhere = "fixture://nobody/x"
    trent_events, alice_events = Inbox(), Inbox()

    async def stats(client: Client) -> dict[str, Any]:
        return (await client.call_tool("a__stats", {})).structured_content

    async with (
        as_principal(node.url, "alice", mode="auto") as alice,
        as_principal(node.url, "trent", mode="auto") as trent,
        as_principal(node.url, "mallory", mode="auto") as mallory,
    ):
        for client in (alice, trent, mallory):
            assert client.protocol_version == "2026-07-28", client.protocol_version
        assert (await stats(alice))["subscribed"] == [], "nothing holds a subscription of a yet"

        # Without a subscriptions/listen rule the stream is refused, before any event.
        refused = await listen_refusal(mallory, tools_list_changed=True, resource_subscriptions=[item])
        assert refused.error.code == FORBIDDEN, refused.error
        assert refused.error.message == "forbidden: the policy does not allow subscriptions/listen", refused.error

        async with trent.listen(resource_subscriptions=[info, item, nowhere]) as trent_stream:
            # The acknowledgement tells nothing either: a resource trent may not read is
            # acknowledged exactly like one that does not exist.
            honored = set(trent_stream.honored.resource_subscriptions or ())
            assert (info in honored) == (nowhere in honored), honored

            async def collect(stream: Any, inbox: Inbox) -> None:
                async for event in stream:
                    inbox.add(event)

            async with anyio.create_task_group() as group:
                group.start_soon(collect, trent_stream, trent_events)

                # Trent's stream took the upstream subscription of the item he may read (the
                # URIs are taken in the order named, so a's info would already be there), and
                # not of a's info.
                subscribed = await eventually(
                    lambda: _subscribed_including(alice, item), timeout=WAIT, what=f"{item} to be subscribed upstream"
                )
                assert info not in subscribed, subscribed

                async with alice.listen(resource_subscriptions=[info]) as alice_stream:
                    group.start_soon(collect, alice_stream, alice_events)
                    await eventually(
                        lambda: _subscribed_including(alice, info), timeout=WAIT, what=f"{info} to be subscribed upstream"
                    )

                    # The update of a's info reaches alice, who may read it...
                    assert text_of(await alice.call_tool("a__touch", {"uri": info})) == "announced"
                    await alice_events.until(lambda e: e == ResourceUpdated(uri=info), f"the update of {info} at alice")
                    # ...then a marker from the same upstream: the item's update reaches trent,
                    # and nothing of a's info came before it.
                    assert text_of(await alice.call_tool("a__touch", {"uri": item})) == "announced"
                    await trent_events.until(lambda e: e == ResourceUpdated(uri=item), f"the update of {item} at trent")
                    assert trent_events.items == [ResourceUpdated(uri=item)], trent_events.items
                    # Alice did not ask for the item: a second update of a's info, sent by the
                    # same upstream after the item's, is the next thing on her stream.
                    assert text_of(await alice.call_tool("a__touch", {"uri": info})) == "announced"
                    await alice_events.until(
                        lambda _: alice_events.items.count(ResourceUpdated(uri=info)) == 2, f"a second update of {info}"
                    )
                    assert alice_events.items == [ResourceUpdated(uri=info)] * 2, alice_events.items
                group.cancel_scope.cancel()

        # Closing the streams released both upstream subscriptions.
        async def released() -> bool:
            return (await stats(alice))["subscribed"] == []

        await eventually(released, timeout=WAIT, what="the upstream subscriptions to be released")


async def listen_refusal(client: Client, **subscription: Any) -> MCPError:
    """The error a refused `subscriptions/listen` is answered with: the refusal comes instead
    of the acknowledgement, so the SDK raises it on entering and no event is delivered."""
    events: list[Any] = []
    try:
        async with client.listen(**subscription) as stream:
            async for event in stream:
                events.append(event)
    except MCPError as error:
        assert events == [], events
        return error
    raise AssertionError(f"subscriptions/listen was not refused (events: {events})")


async def test_a_refused_listen_is_not_acknowledged_first(node: Any) -> None:
    async with as_principal(node.url, "mallory", mode="auto") as mallory:
        assert mallory.protocol_version == "2026-07-28"
        with pytest.raises(MCPError) as refused:
            async with mallory.listen(tools_list_changed=True):
                pass
        assert refused.value.error.code == FORBIDDEN, refused.value.error


async def _subscribed_including(client: Client, uri: str) -> list[str] | None:
    subscribed = (await client.call_tool("a__stats", {})).structured_content["subscribed"]
    return subscribed if uri in subscribed else None


# --------------------------------------------------------------------------------------
# 5. A hidden tool of a stopped upstream is unknown, not unavailable
# --------------------------------------------------------------------------------------


async def test_a_hidden_tool_of_a_stopped_server_is_unknown_not_unavailable(down_node: Any) -> None:
    node, upstream = down_node
    async with as_principal(node.url, "alice") as alice, as_principal(node.url, "mallory") as mallory:
        assert text_of(await alice.call_tool("a__echo", {"message": "up"})) == "Echo: up"
        # While a is up, its tool is unknown to mallory.
        up_hidden = await error_of(mallory.call_tool("a__echo", {"message": "x"}))
        up_unknown = await error_of(mallory.call_tool("a__no_such_tool", {}))
        same_answer(up_hidden, "a__echo", up_unknown, "a__no_such_tool")

        upstream.stop()

        # Alice, who may use a, learns that it is down (the node notices on its own schedule:
        # wait for the answer itself).
        async def unavailable_to_alice() -> MCPError | None:
            try:
                await alice.call_tool("a__echo", {"message": "down?"})
            except MCPError as error:
                return error if error.error.code == UNAVAILABLE else None
            return None

        alice_error = await eventually(unavailable_to_alice, timeout=WAIT * 2, what="alice to see a unavailable")
        assert alice_error.error.message.startswith("server 'a' is unavailable"), alice_error.error
        alice_prompt = await error_of(alice.get_prompt("a__greet", {"who": "x"}))
        assert alice_prompt.error.code == UNAVAILABLE, alice_prompt.error

        # Mallory gets exactly the "unknown" she gets for a name that exists nowhere, and what
        # she got while a was up: nothing tells her that a__echo exists or that a is down.
        hidden = await error_of(mallory.call_tool("a__echo", {"message": "x"}))
        unknown = await error_of(mallory.call_tool("a__no_such_tool", {}))
        assert "unknown tool" in unknown.error.message, unknown.error
        same_answer(hidden, "a__echo", unknown, "a__no_such_tool")
        same_answer(hidden, "a__echo", up_hidden, "a__echo")
        hidden_prompt = await error_of(mallory.get_prompt("a__greet", {"who": "x"}))
        unknown_prompt = await error_of(mallory.get_prompt("a__no_such_prompt", {"who": "x"}))
        assert "unknown prompt" in unknown_prompt.error.message, unknown_prompt.error
        same_answer(hidden_prompt, "a__greet", unknown_prompt, "a__no_such_prompt")

        # b is unaffected, for mallory too.
        assert text_of(await mallory.call_tool("b__echo", {"message": "still"})) == "Echo: still"

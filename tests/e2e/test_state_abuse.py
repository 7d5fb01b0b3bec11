"""Attacks on the shared state through a real node (issue "One front door", holes 9-11), each
of which worked before and must now fail:

- 9: one `+100` proposal committed three times (300), concurrently by many clients, or by a
  principal the policy does not let write what the proposal writes;
- 10: mallory's idempotency key `order-42` turning alice's write to `orders/42` into a "replay"
  of mallory's result, and a key reused for a different request (MCP and REST);
- 11: the SSE change feed (pages of 500 rows) cutting a commit of 501 keys, and the MCP feed
  cutting a commit of exactly its page size plus one;
- and client numbers the node did arithmetic on: a lease `ttl_ms` whose `now + ttl` overflows,
  a `since` past the store's range that wrapped around and replayed the whole history.

Two principals (JWT, HS256) on a node with auth on: alice may write anything, mallory only the
`notes` namespace; the feed tests use a node without auth."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import Node, NodeFactory, connect

pytestmark = pytest.mark.anyio

SECRET = "abuse-secret-abuse-secret-abuse-secret"
ISSUER = "https://idp.abuse.test"
AUDIENCE = "concord-abuse"

POLICY = """
[[rules]]
name = "users-use-the-state-tools"
effect = "allow"
when = '"user" in principal.roles && method == "tools/call" && server == "concord"'

[[rules]]
name = "users-read-state"
effect = "allow"
when = '"user" in principal.roles && method == "state/read"'

[[rules]]
name = "writers-write-anything"
effect = "allow"
when = '"writer" in principal.roles && method == "state/write"'

[[rules]]
name = "users-write-notes"
effect = "allow"
when = '"user" in principal.roles && method == "state/write" && namespace == "notes"'
"""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_for(sub: str, roles: list[str]) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "abuse"}).encode())
    claims = {"sub": sub, "roles": roles, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    body = _b64url(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


ALICE = token_for("alice", ["user", "writer"])
MALLORY = token_for("mallory", ["user"])


@asynccontextmanager
async def as_principal(node: Node, token: str) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(node.url, http_client=http), mode="legacy", cache=None) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, dict[str, Any]]:
    result = await client.call_tool(f"concord__{tool}", arguments)
    return bool(result.is_error), result.structured_content


def rest_put(node: Node, key: str, body: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{node.base_url}/api/v1/state/{key}", data=json.dumps(body).encode(), headers=headers, method="PUT"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def guarded(concord: NodeFactory) -> Iterator[Node]:
    directory = concord.new_dir("state-abuse")
    (directory / "policy.toml").write_text(POLICY)
    extra = f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
authorization_servers = ["{ISSUER}"]
leeway = "5s"
[[auth.keys]]
kid = "abuse"
algorithm = "HS256"
secret = "{SECRET}"

[policy]
file = "policy.toml"
"""
    node = concord.start("state-abuse", {}, directory=directory, extra_config=extra)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def open_node(concord: NodeFactory) -> Iterator[Node]:
    node = concord.start("state-abuse-feed", {})
    yield node
    node.stop()


# --- 9 -----------------------------------------------------------------------------------------


async def test_a_proposal_commits_once(guarded: Node) -> None:
    async with as_principal(guarded, ALICE) as alice:
        increment = [{"key": "ledger/balance", "base_version": 0, "ops": [{"op": "increment", "path": "", "by": 100}]}]
        failed, proposal = await call(alice, "state_propose", changes=increment)
        assert not failed, proposal
        failed, first = await call(alice, "state_commit", proposal_id=proposal["proposal_id"], idempotency_key="c-1")
        assert not failed and first["replayed"] is False, first
        # The attack: the same proposal committed again under fresh keys.
        for key in ("c-2", "c-3"):
            failed, again = await call(alice, "state_commit", proposal_id=proposal["proposal_id"], idempotency_key=key)
            assert failed and again["already_committed"] is True, again
            assert "already committed" in again["error"], again
        # A retry of the commit that applied it answers with its result.
        failed, retry = await call(alice, "state_commit", proposal_id=proposal["proposal_id"], idempotency_key="c-1")
        assert not failed and retry["replayed"] is True and retry["seq"] == first["seq"], retry
        _, balance = await call(alice, "state_get", key="ledger/balance")
        assert balance["value"] == 100 and balance["version"] == 1, balance


async def test_concurrent_commits_of_one_proposal_exactly_one_wins(guarded: Node) -> None:
    async with as_principal(guarded, ALICE) as alice:
        increment = [{"key": "ledger/race", "base_version": 0, "ops": [{"op": "increment", "path": "", "by": 100}]}]
        _, proposal = await call(alice, "state_propose", changes=increment)
        outcomes: list[tuple[bool, dict[str, Any]]] = []

        async def commit(attempt: int) -> None:
            async with as_principal(guarded, ALICE) as client:
                outcomes.append(
                    await call(client, "state_commit", proposal_id=proposal["proposal_id"], idempotency_key=f"race-{attempt}")
                )

        async with anyio.create_task_group() as group:
            for attempt in range(8):
                group.start_soon(commit, attempt)
        won = [outcome for failed, outcome in outcomes if not failed]
        lost = [outcome for failed, outcome in outcomes if failed]
        assert len(won) == 1 and won[0]["replayed"] is False, outcomes
        assert len(lost) == 7 and all(o.get("already_committed") is True for o in lost), outcomes
        _, race = await call(alice, "state_get", key="ledger/race")
        assert race["value"] == 100, race


async def test_commit_rechecks_the_policy_for_the_committer(guarded: Node) -> None:
    async with as_principal(guarded, ALICE) as alice, as_principal(guarded, MALLORY) as mallory:
        # Mallory may not write orders/: proposing it herself is refused...
        failed, refused = await call(
            mallory, "state_propose", changes=[{"key": "orders/9", "base_version": 0, "ops": [{"op": "set", "value": "mallory's"}]}]
        )
        assert failed and refused["forbidden"] is True, refused
        # ...and so is committing alice's proposal for it (the commit is checked for the committer).
        _, proposal = await call(
            alice, "state_propose", changes=[{"key": "orders/9", "base_version": 0, "ops": [{"op": "set", "value": "alice's"}]}]
        )
        failed, refused = await call(mallory, "state_commit", proposal_id=proposal["proposal_id"])
        assert failed and refused["forbidden"] is True and "mallory may not write orders/9" in refused["error"], refused
        _, order = await call(alice, "state_get", key="orders/9")
        assert order["version"] == 0, order
        failed, committed = await call(alice, "state_commit", proposal_id=proposal["proposal_id"])
        assert not failed and committed["versions"] == {"orders/9": 1}, committed


# --- 10 ----------------------------------------------------------------------------------------


async def test_another_principals_idempotency_key_is_not_a_replay(guarded: Node) -> None:
    async with as_principal(guarded, ALICE) as alice, as_principal(guarded, MALLORY) as mallory:
        failed, planted = await call(
            mallory, "state_put", key="notes/mallory", base_version=0, value="x", idempotency_key="order-42"
        )
        assert not failed, planted
        failed, order = await call(
            alice, "state_put", key="orders/42", base_version=0, value={"item": "book"}, idempotency_key="order-42"
        )
        assert not failed and order["replayed"] is False and order["versions"] == {"orders/42": 1}, order
        _, stored = await call(alice, "state_get", key="orders/42")
        assert stored["value"] == {"item": "book"}, stored
        # Alice's retry is a replay of her own write.
        failed, retry = await call(
            alice, "state_put", key="orders/42", base_version=0, value={"item": "book"}, idempotency_key="order-42"
        )
        assert not failed and retry["replayed"] is True and retry["seq"] == order["seq"], retry
        # The same key for another request is refused, not answered with the first result.
        failed, reused = await call(
            alice, "state_put", key="orders/44", base_version=0, value={"item": "pen"}, idempotency_key="order-42"
        )
        assert failed and reused["idempotency_key_reused"] is True and "different request" in reused["error"], reused
        _, absent = await call(alice, "state_get", key="orders/44")
        assert absent["version"] == 0, absent


def test_rest_scopes_idempotency_keys_and_refuses_reuse_with_422(guarded: Node) -> None:
    status, planted = rest_put(guarded, "notes/rest-m", {"base_version": 0, "value": 1, "idempotency_key": "rest-1"}, MALLORY)
    assert status == 200, planted
    status, written = rest_put(guarded, "orders/rest", {"base_version": 0, "value": "a", "idempotency_key": "rest-1"}, ALICE)
    assert status == 200 and written["replayed"] is False and written["versions"] == {"orders/rest": 1}, written
    status, reused = rest_put(guarded, "orders/rest", {"base_version": 1, "value": "b", "idempotency_key": "rest-1"}, ALICE)
    assert status == 422 and "different request" in reused["error"], (status, reused)


# --- 11 and client numbers ----------------------------------------------------------------------


class Feed:
    """One open SSE connection to the change feed, read event by event."""

    def __init__(self, node: Node, prefix: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        self.conn.request("GET", f"/api/v1/state/changes?prefix={prefix}&since=0", headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def next_event(self) -> dict[str, Any]:
        data: list[str] = []
        while True:
            raw = self.response.readline()
            if not raw:
                raise AssertionError("the feed ended")
            line = raw.decode().rstrip("\r\n")
            if line == "" and data:
                return json.loads("\n".join(data))
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))

    def close(self) -> None:
        self.conn.close()


async def test_the_sse_feed_delivers_every_key_of_a_commit_bigger_than_its_page(open_node: Node) -> None:
    async with connect(open_node.url) as client:
        # The feed reads 500 rows at a time: a commit of 501 keys, then one of exactly 500, then
        # a sentinel commit.
        for name, count in (("big", 501), ("exact", 500), ("sentinel", 1)):
            changes = [{"key": f"bulk/{name}-{i:04}", "base_version": 0, "ops": [{"op": "set", "value": i}]} for i in range(count)]
            failed, written = await call(client, "state_put", changes=changes)
            assert not failed, written
    feed = Feed(open_node, "bulk/")
    try:
        events = [await anyio.to_thread.run_sync(feed.next_event) for _ in range(3)]
    finally:
        feed.close()
    sizes = [len(event["changes"]) for event in events]
    assert sizes == [501, 500, 1], sizes
    keys = {change["key"] for event in events for change in event["changes"]}
    assert len(keys) == 1002


async def test_the_mcp_feed_pages_whole_commits(open_node: Node) -> None:
    async with connect(open_node.url) as client:
        for name, count in (("exact", 5), ("over", 6), ("one", 1)):
            changes = [{"key": f"paged/{name}-{i}", "base_version": 0, "ops": [{"op": "set", "value": i}]} for i in range(count)]
            failed, written = await call(client, "state_put", changes=changes)
            assert not failed, written
        pages: list[list[dict[str, Any]]] = []
        since = 0
        while True:
            failed, page = await call(client, "state_changes", prefix="paged/", since_seq=since, limit=5)
            assert not failed, page
            if not page["changes"]:
                break
            pages.append(page["changes"])
            since = page["next_seq"]
        assert [len(p) for p in pages] == [5, 6, 1], pages
        # A since past the store's range once wrapped around to the whole history.
        failed, past = await call(client, "state_changes", prefix="paged/", since_seq=2**64 - 1)
        assert not failed and past["changes"] == [], past


async def test_a_lease_ttl_that_overflows_is_a_clear_error(open_node: Node) -> None:
    async with connect(open_node.url) as client:
        failed, refused = await call(client, "state_claim", key="jobs/overflow", ttl_ms=2**64 - 1)
        assert failed and "lease" in refused["error"], refused
        # The node is fine and the key is free.
        failed, lease = await call(client, "state_claim", key="jobs/overflow", ttl_ms=30_000)
        assert not failed and lease["granted"] is True and lease["token"] == 1, lease

"""The shared state's change feed (`GET /api/v1/state/changes?prefix=ns/…&since=SEQ`, Server-Sent
Events, one `commit` event per commit with the commit's sequence number as its id) through a real
node: commits made by MCP clients (the official SDK) arrive in order, whole, filtered by prefix;
a client that disconnects and reconnects with `Last-Event-ID` gets exactly the commits it
missed, in order, with no duplicates; and the edge cases of the resume id (zero, pruned
history, garbage) behave as the code says.

Nothing waits on time: a stream is read event by event (each read has a socket timeout that
only guards against a hang), and "nothing else arrived" is proven with a sentinel commit made
afterwards: the feed is in sequence order, so anything extra would come before it."""

from __future__ import annotations

import http.client
import json
import uuid
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlencode

import anyio
import pytest

from conftest import Node, NodeFactory, connect
from test_state import ADMIN_URL, psql

pytestmark = pytest.mark.anyio

READ_GUARD = 30.0  # seconds a single read may block before the test fails (a hang guard)


class Feed:
    """One open SSE connection to a node's change feed, read event by event."""

    def __init__(
        self, node: Node, prefix: str, *, since: int | str | None = None, last_event_id: str | None = None
    ) -> None:
        params: dict[str, Any] = {"prefix": prefix}
        if since is not None:
            params["since"] = since
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=READ_GUARD)
        self.conn.request("GET", f"/api/v1/state/changes?{urlencode(params)}", headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def body(self) -> str:
        return self.response.read().decode(errors="replace")

    def next_event(self) -> dict[str, Any]:
        """The next event (comments and keep-alives skipped): its id, type and JSON data."""
        fields: dict[str, str] = {}
        data: list[str] = []
        while True:
            raw = self.response.readline()
            if not raw:
                raise AssertionError(f"the feed ended (after fields {fields}, data {data})")
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if fields or data:
                    return {"id": fields.get("id"), "event": fields.get("event"), "data": json.loads("\n".join(data))}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    async def events(self, count: int) -> list[dict[str, Any]]:
        return [await anyio.to_thread.run_sync(self.next_event) for _ in range(count)]

    def close(self) -> None:
        self.conn.close()


def summary(event: dict[str, Any]) -> tuple[int, list[tuple[str, int, Any]]]:
    """(sequence number, [(key, version, value)]) of one commit event, checked for shape."""
    assert event["event"] == "commit", event
    seq = event["data"]["seq"]
    assert event["id"] == str(seq), event
    changes = event["data"]["changes"]
    assert all(c["seq"] == seq for c in changes), event
    return seq, [(c["key"], c["version"], c["value"]) for c in changes]


async def put(client: Any, key: str, base_version: int, value: Any) -> int:
    """One single-key commit through MCP; its sequence number."""
    result = await client.call_tool("concord__state_put", {"key": key, "base_version": base_version, "value": value})
    assert not result.is_error, result.structured_content
    return result.structured_content["seq"]


async def put_many(client: Any, changes: dict[str, tuple[int, Any]]) -> int:
    """One multi-key commit (all or nothing) through MCP; its sequence number."""
    result = await client.call_tool(
        "concord__state_put",
        {
            "changes": [
                {"key": key, "base_version": base, "ops": [{"op": "set", "value": value}]}
                for key, (base, value) in changes.items()
            ]
        },
    )
    assert not result.is_error, result.structured_content
    return result.structured_content["seq"]


@contextmanager
def store_for(backend: str) -> Iterator[str | None]:
    """The `--store` of a node: the default SQLite file, or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield None
        return
    database = f"concord_e2e_feed_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {database}")
    try:
        yield f"{ADMIN_URL.partition('?')[0].rsplit('/', 1)[0]}/{database}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def node(concord: NodeFactory, request: pytest.FixtureRequest) -> Iterator[Node]:
    with store_for(request.param) as store:
        node = concord.start(f"change-feed-{request.param}", {}, store=store)
        try:
            yield node
        finally:
            node.stop()


async def test_a_reconnect_with_last_event_id_gets_exactly_the_missed_commits(node: Node) -> None:
    ns = f"feed/{uuid.uuid4().hex[:8]}"
    prefix = f"{ns}/"
    async with connect(node.url) as client:
        # Subscribed before anything is committed under the prefix.
        first = Feed(node, prefix, since=0)
        assert first.status == 200 and first.response.getheader("Content-Type", "").startswith("text/event-stream")

        s1 = await put(client, f"{ns}/plan", 0, {"step": 1})
        # Outside the prefix: a sibling whose name merely starts the same, and another namespace.
        await put(client, f"{ns}-sibling/x", 0, "not mine")
        await put(client, f"other{uuid.uuid4().hex[:6]}/x", 0, "not mine either")
        s2 = await put_many(client, {f"{ns}/plan": (1, {"step": 2}), f"{ns}/owner": (0, "alice")})
        s3 = await put(client, f"{ns}/notes/1", 0, ["a"])
        assert s1 < s2 < s3

        seen = [summary(e) for e in await first.events(3)]
        assert seen == [
            (s1, [(f"{ns}/plan", 1, {"step": 1})]),
            # A multi-key commit is one event with all its keys (sorted by key).
            (s2, [(f"{ns}/owner", 1, "alice"), (f"{ns}/plan", 2, {"step": 2})]),
            (s3, [(f"{ns}/notes/1", 1, ["a"])]),
        ], seen
        last_seen = str(s3)
        first.close()  # the client drops off...

        # ...and misses these.
        s4 = await put(client, f"{ns}/plan", 2, {"step": 3})
        await put(client, f"{ns}-sibling/x", 1, "still not mine")
        s5 = await put_many(client, {f"{ns}/notes/2": (0, ["b"]), f"{ns}/owner": (1, "bob")})
        s6 = await put(client, f"{ns}/notes/1", 1, ["a", "a2"])

        # A browser's EventSource reconnects to the same URL (since=0) with Last-Event-ID: the
        # header wins over the query.
        second = Feed(node, prefix, since=0, last_event_id=last_seen)
        assert second.status == 200
        missed = [summary(e) for e in await second.events(3)]
        assert missed == [
            (s4, [(f"{ns}/plan", 3, {"step": 3})]),
            (s5, [(f"{ns}/notes/2", 1, ["b"]), (f"{ns}/owner", 2, "bob")]),
            (s6, [(f"{ns}/notes/1", 2, ["a", "a2"])]),
        ], missed
        # Nothing else was pending (no repeat of s1..s3, no duplicate of s4..s6): the next
        # event is a commit made only now.
        s7 = await put(client, f"{ns}/done", 0, True)
        assert [summary(e) for e in await second.events(1)] == [(s7, [(f"{ns}/done", 1, True)])]
        second.close()

        # Resuming with ?since= (what `concord state watch` does) is the same thing.
        third = Feed(node, prefix, since=s5)
        assert [summary(e)[0] for e in await third.events(2)] == [s6, s7]
        third.close()


async def test_last_event_id_zero_replays_the_whole_history_of_the_prefix(node: Node) -> None:
    ns = f"feed/{uuid.uuid4().hex[:8]}"
    async with connect(node.url) as client:
        seqs = [await put(client, f"{ns}/k", v, v + 1) for v in range(3)]
        # A later since= in the URL does not matter: the header is the resume point.
        feed = Feed(node, f"{ns}/", since=seqs[-1], last_event_id="0")
        assert [summary(e) for e in await feed.events(3)] == [
            (seq, [(f"{ns}/k", v + 1, v + 1)]) for v, seq in enumerate(seqs)
        ]
        sentinel = await put(client, f"{ns}/end", 0, 0)
        assert summary((await feed.events(1))[0])[0] == sentinel
        feed.close()


async def test_a_bad_since_or_prefix_is_refused(node: Node) -> None:
    for params in ({"prefix": "feed/", "since": "yesterday"}, {"prefix": "feed/", "since": "-1"}, {"since": "0"}):
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=READ_GUARD)
        conn.request("GET", f"/api/v1/state/changes?{urlencode(params)}")
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        conn.close()
        assert response.status == 400, (params, response.status, body)
    invalid = Feed(node, "bad namespace!/")
    assert invalid.status == 400, invalid.body()
    invalid.close()


@pytest.mark.parametrize("garbage", ["abc", "-5", "12abc", "1.5"])
async def test_a_garbage_last_event_id_is_refused_not_replayed_from_zero(node: Node, garbage: str) -> None:
    ns = f"feed/{uuid.uuid4().hex[:8]}"
    async with connect(node.url) as client:
        await put(client, f"{ns}/k", 0, "old")
    feed = Feed(node, f"{ns}/", last_event_id=garbage)
    try:
        body = feed.body() if feed.status != 200 else summary(feed.next_event())
    finally:
        feed.close()
    assert feed.status == 400, (feed.status, body)
    assert "Last-Event-ID must be a commit sequence number" in str(body), body


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_resume_id_older_than_the_kept_history_gets_only_what_is_still_kept(
    concord: NodeFactory, backend: str
) -> None:
    """With `[state] keep_versions`, older versions are pruned from the history the feed reads.
    Resuming from before the pruned versions gets the versions still kept, in order, ending with
    the latest value of every key; the pruned ones are skipped without an error or a marker
    event (only the jump in a key's version numbers shows the gap). The README does not say
    what a too-old resume id gets: this pins today's behaviour."""
    with store_for(backend) as store:
        node = concord.start(
            f"change-feed-pruned-{backend}", {}, extra_config="[state]\nkeep_versions = 2\n", store=store
        )
        try:
            ns = f"feed/{uuid.uuid4().hex[:8]}"
            async with connect(node.url) as client:
                seqs = [await put(client, f"{ns}/k", v, f"v{v + 1}") for v in range(5)]
                other = await put(client, f"{ns}/j", 0, "j1")
                history = await client.call_tool("concord__state_history", {"key": f"{ns}/k"})
                kept = [v["version"] for v in history.structured_content["versions"]]
                assert kept == [5, 4], f"keep_versions = 2 keeps the last two versions: {kept}"

                feed = Feed(node, f"{ns}/", last_event_id=str(seqs[0]))
                assert feed.status == 200
                got = [summary(e) for e in await feed.events(3)]
                assert got == [
                    (seqs[3], [(f"{ns}/k", 4, "v4")]),
                    (seqs[4], [(f"{ns}/k", 5, "v5")]),
                    (other, [(f"{ns}/j", 1, "j1")]),
                ], got
                sentinel = await put(client, f"{ns}/end", 0, 0)
                assert summary((await feed.events(1))[0])[0] == sentinel, "versions 2 and 3 are not sent late either"
                feed.close()
        finally:
            node.stop()

"""Shared agent state through real MCP clients (the official Python SDK): the lost-update
timeline is refused, merge policy keeps disjoint work, and 16 concurrent clients doing
read-modify-write lose nothing — on SQLite, on PostgreSQL, and across two nodes sharing one
PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any, Iterator

import anyio
import pytest

from conftest import Node, NodeFactory, connect, eventually

pytestmark = pytest.mark.anyio

ADMIN_URL = os.environ.get("CONCORD_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")


def psql(sql: str) -> None:
    try:
        done = subprocess.run(
            ["psql", ADMIN_URL, "-v", "ON_ERROR_STOP=1", "-c", sql], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"psql {sql!r} did not finish within 60 s") from e
    assert done.returncode == 0, f"psql {sql!r} failed (PostgreSQL is required for these tests):\n{done.stderr}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database for one test, dropped afterwards whatever the test's outcome (WITH
    (FORCE): connections a failed test's nodes left open do not keep it alive)."""
    database = f"concord_e2e_{uuid.uuid4().hex[:12]}"
    psql(f"CREATE DATABASE {database}")
    try:
        base, _, _ = ADMIN_URL.partition("?")
        yield f"{base.rsplit('/', 1)[0]}/{database}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


MERGE_DOCS = (
    '[state.namespaces.docs]\npolicy = "merge"\n'
    '[state.namespaces.tasks]\nschema = { type = "object", required = ["title"] }\n'
)


@pytest.fixture(scope="module")
def node(concord: NodeFactory) -> Iterator[Node]:
    node = concord.start("state", {}, extra_config=MERGE_DOCS)
    yield node
    node.stop()


async def call(client: Any, tool: str, **arguments: Any) -> tuple[bool, dict[str, Any]]:
    result = await client.call_tool(f"concord__{tool}", arguments)
    return bool(result.is_error), result.structured_content


async def test_the_lost_update_timeline_is_refused(node: Node) -> None:
    async with connect(node.url) as a, connect(node.url) as b:
        _, created = await call(a, "state_put", key="team/context", base_version=0, value={"plan": "v1"})
        # 0 ms: A reads version 1. 5 ms: B reads version 1.
        _, read_a = await call(a, "state_get", key="team/context")
        _, read_b = await call(b, "state_get", key="team/context")
        assert read_a["version"] == read_b["version"] == 1
        # 10 ms: A writes version 2.
        failed, written = await call(a, "state_put", key="team/context", base_version=1, value={"plan": "A's plan"})
        assert not failed and written["versions"]["team/context"] == 2
        # 15 ms: B writes based on version 1: refused, and told what is there now.
        failed, refusal = await call(b, "state_put", key="team/context", base_version=1, value={"plan": "B's plan"})
        assert failed, refusal
        assert refusal["conflict"] is True
        assert refusal["current_version"] == 2
        assert refusal["current_value"] == {"plan": "A's plan"}
        # A's work survives.
        _, now = await call(a, "state_get", key="team/context")
        assert now == {"key": "team/context", "version": 2, "value": {"plan": "A's plan"}}
        _, history = await call(a, "state_history", key="team/context")
        assert [v["version"] for v in history["versions"]] == [2, 1]
        assert history["versions"][0]["author"] == "mcp"  # the SDK client's name, until authentication


async def test_propose_then_commit_and_conflicting_commit(node: Node) -> None:
    async with connect(node.url) as a, connect(node.url) as b:
        await call(a, "state_put", key="team/tasks", base_version=0, value=["design"])
        _, pa = await call(a, "state_propose", changes=[{"key": "team/tasks", "base_version": 1, "ops": [{"op": "json_patch", "patch": [{"op": "add", "path": "/-", "value": "build"}]}]}])
        _, pb = await call(b, "state_propose", changes=[{"key": "team/tasks", "base_version": 1, "ops": [{"op": "set", "value": ["rewrite"]}]}])
        failed, committed = await call(a, "state_commit", proposal_id=pa["proposal_id"])
        assert not failed and committed["versions"] == {"team/tasks": 2}
        failed, again = await call(a, "state_commit", proposal_id=pa["proposal_id"])
        assert not failed and again["seq"] == committed["seq"] and again["replayed"] is True
        failed, refusal = await call(b, "state_commit", proposal_id=pb["proposal_id"])
        assert failed and refusal["conflict"] is True and refusal["current_value"] == ["design", "build"]
        _, now = await call(a, "state_get", key="team/tasks")
        assert now["value"] == ["design", "build"]


async def test_merge_policy_keeps_disjoint_work(node: Node) -> None:
    async with connect(node.url) as a, connect(node.url) as b:
        await call(a, "state_put", key="docs/readme", base_version=0, value={"title": "t", "body": "b"})
        patch = lambda field, text: [{"op": "merge_patch", "patch": {field: text}}]  # noqa: E731
        failed, _ = await call(a, "state_put", key="docs/readme", base_version=1, ops=patch("title", "A"))
        assert not failed
        failed, merged = await call(b, "state_put", key="docs/readme", base_version=1, ops=patch("body", "B"))
        assert not failed, merged
        _, now = await call(a, "state_get", key="docs/readme")
        assert now["value"] == {"title": "A", "body": "B"} and now["version"] == 3
        failed, refusal = await call(b, "state_put", key="docs/readme", base_version=1, ops=patch("title", "B"))
        assert failed and refusal["conflict"] is True


async def test_bad_input_is_a_clear_error_and_changes_nothing(node: Node) -> None:
    async with connect(node.url) as client:
        await call(client, "state_put", key="cfg/limits", base_version=0, value={"n": 1})
        cases = [
            ("state_put", {"key": "cfg/limits", "base_version": 1, "ops": [{"op": "json_patch", "patch": [{"op": "remove", "path": "/nope"}]}]}, "JSON Patch failed"),
            ("state_put", {"key": "cfg/limits", "base_version": 1, "ops": [{"op": "increment", "path": "/n", "by": "lots"}]}, "argument"),
            ("state_put", {"key": "Bad Key!", "base_version": 0, "value": 1}, "invalid key"),
            ("state_put", {"key": "cfg/limits", "base_version": 1, "value": "x" * 2_000_000}, "over the limit"),
            ("state_commit", {"proposal_id": "p-unknown"}, "unknown proposal"),
            ("state_get", {}, "missing argument `key`"),
            ("state_put", {"key": "tasks/t1", "base_version": 0, "value": {"done": True}}, "does not satisfy the schema"),
        ]
        for tool, arguments, expected in cases:
            failed, outcome = await call(client, tool, **arguments)
            assert failed, (tool, arguments, outcome)
            assert expected in outcome["error"], (expected, outcome)
        _, now = await call(client, "state_get", key="cfg/limits")
        assert now == {"key": "cfg/limits", "version": 1, "value": {"n": 1}}


async def contend(urls: list[str], key: str, clients: int = 16, rounds: int = 50) -> list[tuple[int, int]]:
    """`clients` MCP clients (spread over `urls`) each do `rounds` read-modify-write increments,
    retrying on conflict. Returns every successful (version read, value written)."""
    done: list[tuple[int, int]] = []

    async def worker(index: int) -> None:
        async with connect(urls[index % len(urls)]) as client:
            for _ in range(rounds):
                while True:
                    _, read = await call(client, "state_get", key=key)
                    value = (read.get("value") or 0) + 1
                    failed, outcome = await call(client, "state_put", key=key, base_version=read["version"], value=value)
                    if not failed:
                        done.append((read["version"], value))
                        break
                    assert outcome.get("conflict") is True, outcome

    async with anyio.create_task_group() as group:
        for index in range(clients):
            group.start_soon(worker, index)
    return done


async def check_linearizable(url: str, key: str, done: list[tuple[int, int]]) -> None:
    assert len(done) == 800
    # Every acknowledged write was based on the version just before the one it created.
    assert sorted(version for version, _ in done) == list(range(0, 800))
    assert sorted(value for _, value in done) == list(range(1, 801))
    async with connect(url) as client:
        _, now = await call(client, "state_get", key=key)
        assert now["value"] == 800 and now["version"] == 800
        _, history = await call(client, "state_history", key=key, limit=1000)
        versions = history["versions"]
        assert len(versions) == 800
        assert [v["value"] for v in reversed(versions)] == list(range(1, 801))
        seqs = [v["seq"] for v in reversed(versions)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 800


async def test_contention_on_sqlite(node: Node) -> None:
    done = await contend([node.url], "race/sqlite")
    await check_linearizable(node.url, "race/sqlite", done)


async def test_contention_on_postgres_across_two_nodes(concord: NodeFactory, postgres_url: str) -> None:
    first = concord.start("state-pg-1", {}, store=postgres_url)
    try:
        second = concord.start("state-pg-2", {}, store=postgres_url)
    except BaseException:
        first.kill()
        raise
    try:
        done = await contend([first.url, second.url], "race/postgres")
        await check_linearizable(second.url, "race/postgres", done)
        # The change feed of either node sees every commit, whichever node made it.
        for node in (first, second):
            async with connect(node.url) as client:
                _, feed = await call(client, "state_changes", prefix="race/", since_seq=0, limit=1000)
                versions = [c["version"] for c in feed["changes"] if c["key"] == "race/postgres"]
                assert versions == list(range(1, 801)), f"{node.label}: {len(versions)} changes"
    finally:
        try:
            first.stop()
        finally:
            second.stop()


async def test_kill_9_mid_stream_loses_no_acknowledged_commit(concord: NodeFactory) -> None:
    directory = concord.new_dir("state-crash")
    node = concord.start("state-crash", {}, directory=directory)
    acknowledged = 0
    versions = {"crash/a": 0, "crash/b": 0}
    enough = anyio.Event()  # 25 commits acknowledged
    killed = False
    ended: list[BaseException] = []  # how the writer's connection died with the node

    async def write_forever() -> None:
        nonlocal acknowledged
        try:
            async with connect(node.url) as client:
                n = 0
                while True:
                    n += 1
                    changes = [
                        {"key": key, "base_version": version, "ops": [{"op": "set", "value": n}]}
                        for key, version in versions.items()
                    ]
                    failed, outcome = await call(client, "state_put", changes=changes)
                    assert not failed, outcome
                    versions.update(outcome["versions"])
                    acknowledged = n
                    if n >= 25:
                        enough.set()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as error:
            # Only the connection dying with the killed node ends the writer; anything else
            # (its own assertion above all) fails the test.
            if not killed or _has_assertion(error):
                raise
            ended.append(error)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(write_forever)
            await enough.wait()
            killed = True
            node.kill()  # SIGKILL, mid-stream
    assert ended, "the writer stopped without its connection failing"
    assert acknowledged >= 25

    restarted = concord.start("state-crash-restarted", {}, directory=directory)
    try:
        async with connect(restarted.url) as client:
            _, a = await call(client, "state_get", key="crash/a")
            _, b = await call(client, "state_get", key="crash/b")
        # Both keys were written in every commit: never one without the other.
        assert a["value"] == b["value"] and a["version"] == b["version"], (a, b)
        # Every acknowledged commit is there (the one in flight at the kill may be too).
        assert a["value"] in (acknowledged, acknowledged + 1), (a, acknowledged)
    finally:
        restarted.stop()


def _has_assertion(error: BaseException) -> bool:
    if isinstance(error, AssertionError):
        return True
    if isinstance(error, BaseExceptionGroup):
        return any(_has_assertion(e) for e in error.exceptions)
    return _has_assertion(error.__cause__) if error.__cause__ is not None else False


async def test_leases_through_mcp_refuse_a_stale_fencing_token(node: Node) -> None:
    async with connect(node.url) as worker, connect(node.url) as intruder:
        failed, lease = await call(worker, "state_claim", key="jobs/deploy", ttl_ms=60_000)
        assert not failed and lease["granted"] is True, lease
        failed, held = await call(intruder, "state_claim", key="jobs/deploy")
        assert not failed and held["granted"] is False and held["holder"] == lease["holder"]
        failed, refused = await call(intruder, "state_put", key="jobs/deploy", base_version=0, value="intruder")
        assert failed and "leased" in refused["error"] and refused["lease"]["token"] == lease["token"], refused
        failed, written = await call(
            worker, "state_put", key="jobs/deploy", base_version=0, value="deployed", lease_token=lease["token"]
        )
        assert not failed, written
        failed, _ = await call(worker, "state_release", key="jobs/deploy", token=lease["token"])
        assert not failed
        failed, stale = await call(
            worker, "state_put", key="jobs/deploy", base_version=1, value="again", lease_token=lease["token"]
        )
        assert failed and "stale" in stale["error"], stale
        _, now = await call(intruder, "state_get", key="jobs/deploy")
        assert now["value"] == "deployed" and now["version"] == 1


async def test_state_keys_are_resources_with_update_notifications(node: Node) -> None:
    import json as _json

    from mcp.types import ResourceUpdatedNotification

    uri = "concord://state/team/board"
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)

    async with connect(node.url, message_handler=on_message) as watcher, connect(node.url) as writer:
        templates = {t.uri_template for t in (await watcher.list_resource_templates()).resource_templates}
        assert "concord://state/{+key}" in templates
        await call(writer, "state_put", key="team/board", base_version=0, value={"columns": ["todo"]})
        contents = (await watcher.read_resource(uri)).contents
        assert _json.loads(contents[0].text) == {"key": "team/board", "version": 1, "value": {"columns": ["todo"]}}

        # A barrier instead of pauses: updates reach the watcher in commit order, so once the
        # update of a later commit to `marker` is there, any update of an earlier commit that
        # was going to come has come.
        marker = "concord://state/team/marker"
        marker_version = 0

        async def barrier() -> None:
            nonlocal marker_version
            count = updates.count(marker)
            failed, written = await call(writer, "state_put", key="team/marker", base_version=marker_version, value=marker_version)
            assert not failed, written
            marker_version += 1

            async def marker_arrived() -> bool:
                return updates.count(marker) > count

            await eventually(marker_arrived, timeout=10, what="the barrier's update")

        await watcher.subscribe_resource(uri)
        await watcher.subscribe_resource(marker)
        await call(writer, "state_put", key="team/board", base_version=1, value={"columns": ["todo", "done"]})
        await call(writer, "state_put", key="team/other", base_version=0, value=1)  # not subscribed
        await barrier()
        assert uri in updates and set(updates) == {uri, marker}, updates
        contents = (await watcher.read_resource(uri)).contents
        assert _json.loads(contents[0].text)["version"] == 2

        await watcher.unsubscribe_resource(uri)
        seen = updates.count(uri)
        await call(writer, "state_put", key="team/board", base_version=2, value={"columns": []})
        await barrier()
        assert updates.count(uri) == seen, f"no updates after unsubscribing: {updates}"


async def test_a_validator_tool_reviews_writes(concord: NodeFactory) -> None:
    from conftest import fixture_server

    reviewed = concord.start(
        "state-reviewed",
        {"fx": fixture_server("fx")},
        extra_config='[state.namespaces.reviewed]\nvalidator = "fx__review"\n',
    )
    try:
        async with connect(reviewed.url) as client:
            failed, ok = await call(client, "state_put", key="reviewed/plan", base_version=0, value="a good plan")
            assert not failed, ok
            failed, refused = await call(client, "state_put", key="reviewed/plan", base_version=1, value="a bad plan")
            assert failed and "rejected" in refused["error"] and "mentions something bad" in refused["error"], refused
            failed, refused = await call(
                client, "state_propose", changes=[{"key": "reviewed/plan", "base_version": 1, "ops": [{"op": "set", "value": "bad"}]}]
            )
            assert failed and "fx__review" in refused["error"], refused
            _, now = await call(client, "state_get", key="reviewed/plan")
            assert now["value"] == "a good plan" and now["version"] == 1
            # Other namespaces are not reviewed.
            failed, _ = await call(client, "state_put", key="free/x", base_version=0, value="bad is fine here")
            assert not failed
    finally:
        reviewed.stop()

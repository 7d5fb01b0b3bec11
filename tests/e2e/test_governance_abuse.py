"""Governance under abuse, on a real node with the official Python SDK as the client: a forged
budget `parent` (another principal's envelope, a standing budget by its old guessable id), an
upstream reporting a negative cost, a flood of unauthenticated requests against the audit
trail, a deny rule that fails to evaluate, a usage query whose duration overflows, and
configurations that would accept any token (no issuer or audience, a short HS256 secret)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from mcp import MCPError

from conftest import CONCORD_BIN, NodeFactory, fixture_server, stdio_server, text_of
from test_governance import AUDIENCE, ISSUER, SECRET, as_principal, audit_until, cli, http_post, token_for

pytestmark = pytest.mark.anyio

POLICY = """
[[rules]]
name = "everyone"
effect = "allow"
when = 'true'

[[rules]]
name = "no-secret-messages"
effect = "deny"
when = 'tool == "fx__echo" && arguments.message.startsWith("secret")'
"""

# An upstream whose one tool, `report`, returns `arguments.usage` as `_meta["concord/usage"]`
# (newline-delimited JSON-RPC over stdio, no SDK: it reports exactly what a test asks).
USAGE_SERVER = r"""
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message.get("method"), message.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion", "2025-11-25"),
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "usage", "version": "1.0.0"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "report", "description": "Reports the usage it is given",
                             "inputSchema": {"type": "object", "properties": {"usage": {}}}}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": "reported"}],
                  "_meta": {"concord/usage": params["arguments"]["usage"]}}
    else:
        result = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
"""


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    directory = concord.new_dir("governance-abuse")
    (directory / "policy.toml").write_text(POLICY)
    (directory / "usage_server.py").write_text(USAGE_SERVER)
    extra = f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
[[auth.keys]]
kid = "e2e"
algorithm = "HS256"
secret = "{SECRET}"

[policy]
file = "policy.toml"

[budgets.principals.alice]
tool_calls = 4
[budgets.principals.spender]
tool_calls = 100
cost_usd = 1.0
"""
    node = concord.start(
        "governance-abuse",
        {"fx": fixture_server("fx"), "usage": stdio_server(sys.executable, directory / "usage_server.py", report_usage=True)},
        directory=directory,
        extra_config=extra,
    )
    yield node
    node.stop()


async def test_mallory_cannot_spend_alices_budget_by_naming_it_as_parent(node: Any) -> None:
    async with (
        as_principal(node.url, token_for("alice", ["user"])) as alice,
        as_principal(node.url, token_for("mallory", ["user"])) as mallory,
    ):
        first = await alice.call_tool("fx__echo", {"message": "mine"}, meta={"concord/budget": {"tool_calls": 2}})
        envelope = first.meta["received"]["concord/budget"]["id"]
        # The upstream's envelope: 2 calls (within the 3 left of alice's standing 4).
        assert first.meta["received"]["concord/budget"]["remaining"]["tool_calls"] == 2
        for parent, expected in [
            (envelope, "was not issued to mallory"),
            ("principal:alice", "is unknown or has expired"),
        ]:
            with pytest.raises(MCPError) as refused:
                await mallory.call_tool("fx__echo", {"message": "yours"}, meta={"concord/budget": {"parent": parent}})
            assert refused.value.error.code == -32030
            assert expected in refused.value.error.message, refused.value.error.message
        # Alice's budget is untouched: 3 of her 4 calls are left, and her envelope is hers.
        second = await alice.call_tool("fx__echo", {"message": "again"}, meta={"concord/budget": {"parent": envelope}})
        assert second.meta["concord/budget"]["remaining"]["tool_calls"] == 1, second.meta
        third = await alice.call_tool("fx__echo", {"message": "standing"})
        assert third.meta["concord/budget"]["remaining"]["tool_calls"] == 1, third.meta


async def test_a_negative_cost_is_no_refund_and_the_report_is_audited(node: Any) -> None:
    async with as_principal(node.url, token_for("spender", ["user"])) as spender:
        spent = await spender.call_tool("usage__report", {"usage": {"cost_usd": 0.75}})
        assert spent.meta["concord/budget"]["remaining"]["cost_usd"] == pytest.approx(0.25)
        refund = await spender.call_tool("usage__report", {"usage": {"cost_usd": -100.0}})
        assert refund.meta["concord/budget"]["remaining"]["cost_usd"] == pytest.approx(0.25), refund.meta
        huge = await spender.call_tool("usage__report", {"usage": {"input_tokens": 2**64 - 1, "output_tokens": 2**64 - 1}})
        assert not huge.is_error
    _, entries = audit_until(
        node,
        lambda entries: len(entries) >= 2,
        "two budget_usage_invalid entries",
        "query", "--kind", "budget_usage_invalid", "--principal", "spender",
    )
    problems = [problem for entry in entries for problem in entry["data"]["problems"]]
    assert any("negative" in p for p in problems), problems
    assert any("exceeds the maximum" in p for p in problems), problems


async def test_a_flood_of_401s_is_a_few_counted_audit_rows(node: Any) -> None:
    started = time.monotonic()
    for _ in range(300):
        assert http_post(node.url, None)[0] == 401
    # At most two rows per 10 s window the flood spans: the first at once, then the count.
    windows = int(time.monotonic() - started) // 10 + 2

    def counted(entries: list[dict[str, Any]]) -> bool:
        return sum(e["data"]["count"] for e in entries if e["data"]["reason"] == "authentication required") >= 300

    # The first refusal is written at once, the rest with their count when the window ends.
    _, entries = audit_until(node, counted, "300 counted auth failures", "query", "--kind", "auth_failure")
    rows = [e for e in entries if e["data"]["reason"] == "authentication required"]
    assert sum(e["data"]["count"] for e in rows) == 300, rows
    assert len(rows) <= 2 * windows, rows
    assert all(e["data"]["path"] == "/mcp" for e in rows), rows
    verified = cli(node, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_deny_rule_that_fails_to_evaluate_denies(node: Any) -> None:
    async with as_principal(node.url, token_for("denied", ["user"])) as client:
        # The list still shows the tool; every call is decided with its arguments.
        assert "fx__echo" in [t.name for t in (await client.list_tools()).tools]
        assert text_of(await client.call_tool("fx__echo", {"message": "hello"})) == "Echo: hello"
        # `arguments.message` is missing: the deny rule errors, and denies.
        with pytest.raises(MCPError):
            await client.call_tool("fx__echo", {})
    _, entries = audit_until(
        node,
        lambda entries: any("rule_error" in e["data"] for e in entries),
        "a decision naming the failed rule",
        "query", "--kind", "policy_decision", "--principal", "denied",
    )
    failed = [e for e in entries if "rule_error" in e["data"]]
    assert failed[0]["data"]["rule"] == "no-secret-messages" and failed[0]["data"]["allowed"] is False


def test_usage_since_that_overflows_is_a_400(node: Any) -> None:
    request = urllib.request.Request(
        f"{node.base_url}/api/v1/usage?since=100000000000000000000000h",
        headers={"Authorization": f"Bearer {token_for('admin', ['user'])}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"].startswith("since: ")


@pytest.mark.parametrize(
    "auth,key",
    [
        (f'audience = "{AUDIENCE}"\n[[auth.keys]]\nkid = "k"\nalgorithm = "HS256"\nsecret = "{SECRET}"\n', "auth.issuer"),
        (f'issuer = "{ISSUER}"\njwks_url = "https://idp.example/jwks.json"\n', "auth.audience"),
        (
            f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n[[auth.keys]]\nkid = "k"\nalgorithm = "HS256"\nsecret = "short"\n',
            "auth.keys[0].secret",
        ),
    ],
)
def test_configs_that_would_accept_any_token_are_refused(node: Any, auth: str, key: str) -> None:
    config = node.directory / f"refused-{key}.toml"
    config.write_text(f"[auth]\nenabled = true\n{auth}")
    done = subprocess.run(
        [str(CONCORD_BIN), "config", "check", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0, done.stdout
    assert key in done.stderr, done.stderr

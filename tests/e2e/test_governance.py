"""Authentication, policy and audit on a real node, with the official Python SDK as the client:
401s that point standard clients at the protected-resource metadata, two principals that see
different tools, a hidden tool that answers exactly like an unknown one, a forbidden state write,
API keys from the CLI, a tamper-evident audit trail, and a policy reload that refuses a broken
file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import CONCORD_BIN, NodeFactory, eventually, fixture_server, text_of, tool_names, wait_until

pytestmark = pytest.mark.anyio

SECRET = "e2e-secret-e2e-secret-e2e-secret-e2e"
RSA_PUBLIC = Path(__file__).resolve().parents[2] / "crates" / "concord-governance" / "testdata" / "rsa1.pub.pem"
ISSUER = "https://idp.e2e.test"
AUDIENCE = "concord-e2e"

POLICY = """
[[rules]]
name = "analysts-echo"
effect = "allow"
when = '"analyst" in principal.roles && method == "tools/call" && tool == "fx__echo"'

[[rules]]
name = "analysts-state-tools"
effect = "allow"
when = '"analyst" in principal.roles && method == "tools/call" && server == "concord"'

[[rules]]
name = "analysts-read-state"
effect = "allow"
when = '"analyst" in principal.roles && method == "state/read"'

[[rules]]
name = "analysts-write-notes"
effect = "allow"
when = '"analyst" in principal.roles && method == "state/write" && namespace == "notes"'

[[rules]]
name = "admins"
effect = "allow"
when = '"admin" in principal.roles'

[[rules]]
name = "nobody-writes-audit-ns"
effect = "deny"
when = 'method == "state/write" && namespace == "locked"'
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256", kid: str = "e2e") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def token_for(sub: str, roles: list[str], **extra: Any) -> str:
    claims = {"sub": sub, "roles": roles, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}
    claims.update(extra)
    return jwt(claims)


@asynccontextmanager
async def as_principal(url: str, token: str, **kwargs: Any) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(url, http_client=http), mode="legacy", cache=None, **kwargs) as client:
        yield client


def http_post(url: str, token: str | None) -> tuple[int, dict[str, str], str]:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


@pytest.fixture(scope="module")
def node(concord: NodeFactory):
    directory = concord.new_dir("governance")
    (directory / "policy.toml").write_text(POLICY)
    extra = f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
authorization_servers = ["{ISSUER}"]
leeway = "5s"
[[auth.keys]]
kid = "e2e"
algorithm = "HS256"
secret = "{SECRET}"
[[auth.keys]]
kid = "rsa"
algorithm = "RS256"
public_key_file = "{RSA_PUBLIC}"

[policy]
file = "policy.toml"

[limits.tools]
"fx__log" = {{ per_second = 0.2, burst = 1 }}

[budgets]
warn_at = 0.5
[budgets.default]
tool_calls = 1000
[budgets.principals.budgeted]
tool_calls = 5
[budgets.principals.warned]
tool_calls = 4

[audit]
record_arguments = true
"""
    node = concord.start(
        "governance",
        {"fx": fixture_server("fx")},
        directory=directory,
        extra_config=extra,
    )
    yield node
    node.stop()


def cli(node: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs `concord ARGS` against the node's config and data dir (killed after 60 s: a CLI that
    hangs fails the test). The caller checks the exit status."""
    return subprocess.run(
        [
            str(CONCORD_BIN),
            *args,
            "--config",
            str(node.directory / "concord.toml"),
            "--data-dir",
            str(node.directory / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=node.directory,
    )


def audit_until(node: Any, condition: Any, what: str, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """Runs `concord audit ARGS` (default: export) until `condition(entries)` holds; audit entries
    are written in batches in the background. Fails on the first non-zero exit, or when the
    condition does not hold within 20 s. Returns the output and its entries."""
    args = args or ("export",)

    def poll() -> subprocess.CompletedProcess[str] | None:
        done = cli(node, "audit", *args)
        if done.returncode != 0:
            return done  # stop waiting: reported below
        entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        return done if condition(entries) else None

    done = wait_until(poll, timeout=20, interval=0.2, what=what)
    assert done.returncode == 0, f"concord audit {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def test_no_token_is_401_with_the_resource_metadata_and_the_metadata_names_the_issuer(node: Any) -> None:
    status, headers, body = http_post(node.url, None)
    assert status == 401, body
    challenge = {k.lower(): v for k, v in headers.items()}["www-authenticate"]
    assert challenge.startswith("Bearer resource_metadata="), challenge
    metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
    with urllib.request.urlopen(metadata_url, timeout=10) as response:
        metadata = json.loads(response.read())
    assert metadata["resource"].endswith("/mcp")
    assert metadata["authorization_servers"] == [ISSUER]


@pytest.mark.parametrize(
    "label,token",
    [
        ("expired", token_for("alice", ["analyst"], exp=int(time.time()) - 600)),
        ("wrong audience", token_for("alice", ["analyst"], aud="someone-else")),
        ("wrong issuer", token_for("alice", ["analyst"], iss="https://evil.test")),
        ("not yet valid", token_for("alice", ["analyst"], nbf=int(time.time()) + 600)),
        (
            # HS256 "signed" with the RSA public key as the HMAC secret, naming the RSA key.
            "algorithm confusion",
            jwt(
                {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600},
                secret=RSA_PUBLIC.read_text(),
                kid="rsa",
            ),
        ),
        ("forged", jwt({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600}, secret="x" * 40)),
        ("alg none", b64url(b'{"alg":"none"}') + "." + b64url(b'{"sub":"alice"}') + "."),
        ("garbage", "not-a-token"),
        ("unknown api key", "ck_000000000000_" + "0" * 64),
    ],
)
async def test_bad_credentials_are_401_invalid_token(node: Any, label: str, token: str) -> None:
    status, headers, body = http_post(node.url, token)
    assert status == 401, f"{label}: {status} {body}"
    challenge = {k.lower(): v for k, v in headers.items()}["www-authenticate"]
    assert 'error="invalid_token"' in challenge, challenge
    assert token not in body and token not in challenge, "credentials are never echoed"


async def test_two_principals_see_only_their_tools_and_a_hidden_tool_looks_unknown(node: Any) -> None:
    async with (
        as_principal(node.url, token_for("alice", ["analyst"])) as analyst,
        as_principal(node.url, token_for("root", ["admin"])) as admin,
    ):
        analyst_tools = await tool_names(analyst)
        admin_tools = await tool_names(admin)
        assert "fx__echo" in analyst_tools and "fx__echo" in admin_tools
        assert "fx__slow" not in analyst_tools and "fx__slow" in admin_tools
        assert text_of(await analyst.call_tool("fx__echo", {"message": "hi"})) == "Echo: hi"

        with pytest.raises(MCPError) as hidden:
            await analyst.call_tool("fx__slow", {"steps": 1})
        with pytest.raises(MCPError) as unknown:
            await analyst.call_tool("fx__no_such_tool", {})
        assert hidden.value.error.code == unknown.value.error.code
        assert hidden.value.error.message.replace("fx__slow", "X") == unknown.value.error.message.replace(
            "fx__no_such_tool", "X"
        )
        # The admin can call it.
        assert text_of(await admin.call_tool("fx__slow", {"steps": 1})) == "done after 1 steps"


async def test_state_writes_follow_the_policy_and_everything_lands_in_a_verifiable_audit_trail(node: Any) -> None:
    # An authentication failure of this test's own, so the trail has one whatever ran before.
    assert http_post(node.url, "not-a-token")[0] == 401
    async with as_principal(node.url, token_for("alice", ["analyst"])) as analyst:
        ok = await analyst.call_tool("concord__state_put", {"key": "notes/today", "base_version": 0, "value": {"text": "hello"}})
        assert not ok.is_error, text_of(ok)
        assert ok.structured_content["versions"]["notes/today"] == 1
        refused = await analyst.call_tool("concord__state_put", {"key": "plans/q3", "base_version": 0, "value": {"x": 1}})
        assert refused.is_error
        assert refused.structured_content["forbidden"] is True
        assert "alice may not write plans/q3" in refused.structured_content["error"]
        locked = await analyst.call_tool("concord__state_put", {"key": "locked/x", "base_version": 0, "value": 1})
        assert locked.is_error and locked.structured_content["forbidden"] is True
        # Nothing was written by the refused calls.
        entry = await analyst.call_tool("concord__state_get", {"key": "plans/q3"})
        assert entry.structured_content["version"] == 0
        history = await analyst.call_tool("concord__state_history", {"key": "notes/today"})
        assert history.structured_content["versions"][0]["author"] == "alice"

    # Audit entries are written in batches in the background: wait until all of them are there.
    def all_written(entries: list[dict[str, Any]]) -> bool:
        decisions = [e for e in entries if e["kind"] == "policy_decision" and e["data"].get("key") == "plans/q3"]
        locked_decisions = [
            e for e in entries if e["kind"] == "policy_decision" and e["data"].get("rule") == "nobody-writes-audit-ns"
        ]
        failures = [e for e in entries if e["kind"] == "auth_failure"]
        return bool(decisions and locked_decisions and failures)

    _, entries = audit_until(node, all_written, "the policy decisions and the auth failure in the audit trail")
    decisions = [e for e in entries if e["kind"] == "policy_decision" and e["data"].get("key") == "plans/q3"]
    assert decisions[0]["data"]["allowed"] is False and decisions[0]["principal"] == "alice", decisions
    assert any(e["kind"] == "policy_decision" and e["data"].get("rule") == "nobody-writes-audit-ns" for e in entries)
    assert any(e["kind"] == "auth_failure" for e in entries)
    assert all(SECRET not in json.dumps(e) for e in entries), "no secret in the audit trail"
    verified = cli(node, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout


async def test_api_keys_from_the_cli_work_until_revoked(node: Any) -> None:
    created = cli(node, "keys", "create", "--principal", "ci-bot", "--role", "analyst")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ck_")
    listed = cli(node, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ci-bot" in listed.stdout and key not in listed.stdout, "listing never shows secrets"

    async with as_principal(node.url, key) as bot:
        assert text_of(await bot.call_tool("fx__echo", {"message": "key"})) == "Echo: key"

    key_id = key.split("_")[1]
    revoked = cli(node, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # The node learns of the revocation from the store on its own schedule: wait for the
    # refusal itself.
    def refused() -> tuple[int, str] | None:
        status, _, body = http_post(node.url, key)
        return (status, body) if status == 401 else None

    status, body = wait_until(refused, timeout=20, interval=0.1, what="the revoked key to be refused")
    assert "revoked" in body, body


async def test_a_broken_policy_file_keeps_the_old_policy(node: Any) -> None:
    policy = Path(node.directory) / "policy.toml"
    good = policy.read_text()
    try:
        refusals_before = node.log_path.read_text().count("policy file refused")
        policy.write_text('[[rules]]\nname = "broken"\neffect = "allow"\nwhen = "principal.id =="\n')
        wait_until(
            lambda: node.log_path.read_text().count("policy file refused") > refusals_before,
            timeout=15,
            interval=0.2,
            what="the node to refuse the broken policy file (its log)",
        )
        async with as_principal(node.url, token_for("alice", ["analyst"])) as analyst:
            assert text_of(await analyst.call_tool("fx__echo", {"message": "still"})) == "Echo: still"
            assert "fx__slow" not in await tool_names(analyst)
    finally:
        policy.write_text(good)


async def test_a_tool_over_its_rate_limit_is_refused_with_a_retry_time(node: Any) -> None:
    async with as_principal(node.url, token_for("rate-tester", ["admin"])) as admin:
        assert text_of(await admin.call_tool("fx__log", {"message": "one"})) == "logged"
        with pytest.raises(MCPError) as limited:
            await admin.call_tool("fx__log", {"message": "two"})
        assert limited.value.error.code == -32029
        assert "rate limit exceeded (tool fx__log for principal rate-tester)" in limited.value.error.message
        assert 0 < limited.value.error.data["retry_after_ms"] <= 5000
        # Other tools are not affected.
        assert text_of(await admin.call_tool("fx__echo", {"message": "x"})) == "Echo: x"


async def test_tool_calls_are_audited_with_redacted_arguments(node: Any) -> None:
    async with as_principal(node.url, token_for("auditor", ["admin"])) as admin:
        await admin.call_tool("fx__echo", {"message": "audit me", "api_token": "s3cr3t-value"})
        await admin.call_tool("concord__state_put", {"key": "notes/audited", "base_version": 0, "value": 1})
        await admin.call_tool("concord__state_put", {"key": "notes/audited", "base_version": 0, "value": 2})
    def all_written(entries: list[dict[str, Any]]) -> bool:
        kinds = {e["kind"] for e in entries if e["principal"] == "auditor"}
        return {"tool_call", "state_commit", "state_conflict"} <= kinds

    stdout, entries = audit_until(node, all_written, "the auditor's entries in the audit trail")
    calls = [e for e in entries if e["kind"] == "tool_call" and e["principal"] == "auditor"]
    commits = [e for e in entries if e["kind"] == "state_commit" and e["principal"] == "auditor"]
    conflicts = [e for e in entries if e["kind"] == "state_conflict" and e["principal"] == "auditor"]
    call = calls[0]["data"]
    assert call["tool"] == "echo" and call["server"] == "fx" and call["outcome"] == "ok"
    assert call["arguments"] == {"message": "audit me", "api_token": "***"}
    assert call["response_bytes"] > 0 and call["request_bytes"] > 0
    assert "s3cr3t-value" not in stdout
    assert commits and commits[0]["data"]["versions"] == {"notes/audited": 1}
    assert conflicts and conflicts[0]["data"]["keys"][0]["current_version"] == 1


async def test_ten_concurrent_calls_against_a_budget_of_five(node: Any) -> None:
    outcomes: list[tuple[str, Any]] = []
    async with as_principal(node.url, token_for("budgeted", ["admin"])) as client:

        async def one() -> None:
            try:
                result = await client.call_tool("fx__slow", {"steps": 3})
                outcomes.append(("ok", text_of(result)))
            except MCPError as refused:
                outcomes.append(("refused", refused.error))

        async with anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(one)
    done = [o for o in outcomes if o[0] == "ok"]
    refused = [o[1] for o in outcomes if o[0] == "refused"]
    assert len(done) == 5 and len(refused) == 5, outcomes
    for error in refused:
        assert error.code == -32030
        assert "tool_calls budget exhausted: the standing budget of budgeted" in error.message, error.message
    # Every refusal is on the audit trail.
    stdout, _ = audit_until(
        node,
        lambda entries: len(entries) >= 5,
        "five budget_exhausted entries in the audit trail",
        "query", "--kind", "budget_exhausted", "--principal", "budgeted",
    )
    assert len(stdout.splitlines()) == 5, stdout


async def test_a_client_cannot_speak_for_the_gateway_in_meta(node: Any) -> None:
    async with as_principal(node.url, token_for("honest", ["admin"])) as client:
        result = await client.call_tool(
            "fx__echo",
            {"message": "x"},
            meta={"concord/caller": {"principal": "mallory"}, "concord/budget": {"id": "forged"}},
        )
    received = result.meta["received"]
    assert received["concord/caller"]["principal"] == "honest"
    assert received["concord/budget"]["id"] != "forged"


async def test_a_three_level_chain_cannot_overspend_its_root(node: Any) -> None:
    async with as_principal(node.url, token_for("chain-user", ["admin"])) as client:
        # The root call asks for an envelope of 3 tool calls for whatever runs on its behalf.
        root = await client.call_tool("fx__echo", {"message": "root"}, meta={"concord/budget": {"tool_calls": 3}})
        child_envelope = root.meta["received"]["concord/budget"]
        assert child_envelope["depth"] == 1 and child_envelope["remaining"]["tool_calls"] == 3
        # The upstream also learns who the call is for.
        assert root.meta["received"]["concord/caller"]["principal"] == "chain-user"
        # The child (an agent acting for the root call) asks its own sub-agent for more than
        # the root allows: the envelope is carved from the root's remainder.
        child = await client.call_tool(
            "fx__echo", {"message": "child"}, meta={"concord/budget": {"parent": child_envelope["id"], "tool_calls": 10}}
        )
        grandchild_envelope = child.meta["received"]["concord/budget"]
        assert grandchild_envelope["depth"] == 2
        assert grandchild_envelope["remaining"]["tool_calls"] == 2, grandchild_envelope
        # The grandchild spends until the root's envelope is gone.
        spent = 0
        refusal = None
        for _ in range(6):
            try:
                await client.call_tool(
                    "fx__echo", {"message": "leaf"}, meta={"concord/budget": {"parent": grandchild_envelope["id"]}}
                )
                spent += 1
            except MCPError as error:
                refusal = error
                break
        assert spent == 2, spent
        assert refusal is not None and refusal.error.code == -32030
        assert f"the budget of call {child_envelope['id']} allows 3 tool calls" in refusal.error.message


async def test_a_deadline_that_passes_mid_call_cancels_the_upstream_call(node: Any) -> None:
    async with as_principal(node.url, token_for("in-a-hurry", ["admin"])) as client:
        before = (await client.call_tool("fx__stats", {})).structured_content
        with pytest.raises(MCPError) as expired:
            # 50 steps of 100 ms: only a deadline that cuts the call short ends it with an error.
            await client.call_tool("fx__slow", {"steps": 50}, meta={"concord/budget": {"deadline_ms": 400}})
        assert expired.value.error.code == -32030
        assert "deadline passed" in expired.value.error.message

        # The upstream call was cancelled at the deadline, not left running (nor finished).
        async def upstream_saw_cancel() -> dict[str, Any] | None:
            stats = (await client.call_tool("fx__stats", {})).structured_content
            return stats if len(stats["cancelled"]) > len(before["cancelled"]) else None

        stats = await eventually(upstream_saw_cancel, timeout=15, interval=0.1, what="fx to get notifications/cancelled")
        assert len(stats["cancelled"]) == len(before["cancelled"]) + 1, (before, stats)


async def test_past_the_warning_threshold_the_result_says_so(node: Any) -> None:
    async with as_principal(node.url, token_for("warned", ["admin"])) as client:
        first = await client.call_tool("fx__echo", {"message": "1"})
        report = first.meta["concord/budget"]
        assert report["remaining"]["tool_calls"] == 3 and "warning" not in report, report
        second = await client.call_tool("fx__echo", {"message": "2"})
        assert "the standing budget of warned is 50% spent" in second.meta["concord/budget"]["warning"]

"""Agents as MCP tools: an `[agents.NAME]` agent is the tool `agents__NAME`; it resolves its
providers through the mesh (providers are `llm` entities), runs the agentic loop against a scripted
OpenAI-compatible server that speaks the real wire format, calls a real tool through the gateway,
fails over from a provider that answers 500 to the next, keeps the conversation under the id it
returns, and every provider attempt shows in the usage ledger (`concord costs`)."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from mcp import MCPError

from conftest import CONCORD_BIN, NodeFactory, connect, fixture_server, free_port, tool_names, wait_until
from test_registry import replicas  # noqa: F401 - a fixture: two concord-fixture servers over HTTP
from test_state import postgres_url  # noqa: F401 - a fixture: a fresh PostgreSQL database per test

pytestmark = pytest.mark.anyio


class ScriptedModel:
    """An OpenAI-compatible `/v1/chat/completions` endpoint answering from a script of turns
    (a tool call, or text); it records every request body. `failing` answers HTTP 500."""

    def __init__(self, turns: list[dict[str, Any]] | None = None, failing: bool = False) -> None:
        self.turns = list(turns or [])
        self.failing = failing
        self.requests: list[dict[str, Any]] = []
        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model.requests.append(body)
                if model.failing:
                    self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
                    return
                turn = model.turns.pop(0) if model.turns else {"text": "script exhausted"}
                if "call" in turn:
                    name, arguments = turn["call"]
                    message = {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": f"call_{len(model.requests)}",
                                "type": "function",
                                "function": {"name": name, "arguments": json.dumps(arguments)},
                            }
                        ],
                    }
                    finish = "tool_calls"
                else:
                    message = {"role": "assistant", "content": turn["text"]}
                    finish = "stop"
                self._send(
                    200,
                    {
                        "id": "chatcmpl-e2e",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "scripted-1",
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": 200, "completion_tokens": 30, "total_tokens": 230},
                    },
                )

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()


def deps_show(node: Any, name: str) -> str:
    """`concord deps show NAME`: what each of its dependencies resolves to."""
    deps = subprocess.run(
        [str(CONCORD_BIN), "deps", "show", name, "--url", node.url], capture_output=True, text=True, timeout=30
    )
    assert deps.returncode == 0, deps.stdout + deps.stderr
    return deps.stdout


@pytest.fixture
def models() -> Iterator[tuple[ScriptedModel, ScriptedModel]]:
    primary = ScriptedModel(failing=True)
    backup = ScriptedModel()
    yield primary, backup
    primary.close()
    backup.close()


def agent_config(primary: ScriptedModel, backup: ScriptedModel) -> str:
    return f"""
[providers.primary]
api = "openai"
base_url = "{primary.base_url}"
model = "big-model"
tags = ["remote"]
price_input = 3.0
price_output = 15.0

[providers.backup]
api = "openai"
base_url = "{backup.base_url}"
model = "small-model"
tags = ["local"]
price_input = 1.0
price_output = 2.0

[agents.helper]
description = "Answers questions, echoing through the fixture when asked"
instructions = "Use fx__echo when asked to echo. After a tool result, answer in one short sentence."
provider = {{ tags = ["+remote"] }}
tools = ["fx__echo"]
max_iterations = 4
"""


async def test_an_agent_is_a_tool_that_runs_the_loop_through_the_gateway(
    concord: NodeFactory, models: tuple[ScriptedModel, ScriptedModel]
) -> None:
    primary, backup = models
    backup.turns = [
        {"call": ("fx__echo", {"message": "hello agents"})},
        {"text": "The fixture echoed: hello agents."},
        {"text": "You asked me to echo hello agents."},
    ]
    node = concord.start("agents", {"fx": fixture_server("fx")}, extra_config=agent_config(primary, backup))
    try:
        async with connect(node.url) as client:
            assert "agents__helper" in await tool_names(client)
            steps: list[tuple[float, str | None]] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                steps.append((progress, message))

            result = await client.call_tool(
                "agents__helper", {"task": "Echo 'hello agents' please."}, progress_callback=on_progress
            )
            assert not result.is_error, result
            # Progress per iteration and per tool call, in order, before the result.
            assert steps == [(1, "iteration 1 of 4"), (2, "calling fx__echo"), (3, "iteration 2 of 4")], steps
            answer = result.structured_content
            assert answer["answer"] == "The fixture echoed: hello agents."
            assert answer["ending"] == {"kind": "answer"}
            assert (answer["iterations"], answer["tool_calls"]) == (2, 1)
            # The primary (preferred by tag) answered 500 twice; the backup answered both turns.
            assert [p["provider"] for p in answer["providers"]] == ["primary", "backup", "primary", "backup"]
            assert "HTTP 500" in answer["providers"][0]["error"]

            # What the model was given: the task, the one allowed tool, then the tool's real result.
            first, second = backup.requests[0], backup.requests[1]
            assert [t["function"]["name"] for t in first["tools"]] == ["fx__echo"]
            assert first["messages"][0]["role"] == "system" and "fx__echo" in first["messages"][0]["content"]
            tool_results = [m["content"] for m in second["messages"] if m["role"] == "tool"]
            assert tool_results == ["Echo: hello agents"], second["messages"]

            # The conversation continues under its id: the model sees the earlier turns.
            follow_up = await client.call_tool(
                "agents__helper", {"task": "What did I ask you before?", "conversation_id": answer["conversation_id"]}
            )
            assert follow_up.structured_content["answer"] == "You asked me to echo hello agents."
            history = [m.get("content") for m in backup.requests[2]["messages"]]
            assert "Echo 'hello agents' please." in history and "The fixture echoed: hello agents." in history

            unknown = await client.call_tool("agents__helper", {"task": "x", "conversation_id": "nope"})
            assert unknown.is_error and "unknown or expired conversation_id" in unknown.structured_content["error"]

        # The ledger: every attempt, failed ones included, with tokens and cost.
        base = node.url.removesuffix("/mcp")
        with urllib.request.urlopen(f"{base}/api/v1/usage?agent=helper", timeout=10) as response:
            usage = json.loads(response.read())
        assert usage["totals"]["calls"] == 6 and usage["totals"]["failed"] == 3, usage["totals"]
        assert usage["totals"]["input_tokens"] == 600
        assert abs(usage["totals"]["cost_usd"] - 3 * (200 * 1.0 + 30 * 2.0) / 1e6) < 1e-12
        costs = subprocess.run(
            [str(CONCORD_BIN), "costs", "--agent", "helper", "--since", "1h", "--url", node.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert costs.returncode == 0, costs.stderr
        assert "helper\tbackup/scripted-1\t3\t0\t600\t90\t0.000780" in costs.stdout, costs.stdout
        assert "helper\tprimary/big-model\t3\t3\t0\t0\t0.000000" in costs.stdout, costs.stdout

        # Providers and agents are registry entities. The primary failed three times in a row,
        # so the node reports it degraded and resolution ranks the backup first.
        def primary_degraded() -> dict[str, str] | None:
            with urllib.request.urlopen(f"{base}/api/v1/registry", timeout=10) as response:
                statuses = {e["name"]: e["status"] for e in json.loads(response.read())["entities"]}
            return statuses if statuses.get("primary") == "degraded" else None

        statuses = wait_until(primary_degraded, timeout=20, interval=0.1, what="the primary provider to be degraded")
        assert statuses["primary"] == "degraded" and statuses["backup"] == "healthy", statuses
        assert statuses["fx"] == "healthy", "configured servers are listed with their upstream's health"
        assert "llm: backup" in deps_show(node, "helper")
    finally:
        node.stop()


async def test_an_agent_with_no_usable_provider_says_why(concord: NodeFactory) -> None:
    config = """
[agents.lonely]
instructions = "Answer."
provider = { tags = ["gpu"] }
"""
    node = concord.start("agents-no-provider", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("agents__lonely", {"task": "hi"})
            assert result.is_error
            assert "no configured provider satisfies the selector" in result.structured_content["error"]
            missing = await client.call_tool("agents__lonely", {})
            assert missing.is_error and "missing argument: task" in missing.structured_content["error"]
            # A lone string argument under another name is taken as the task.
            renamed = await client.call_tool("agents__lonely", {"query": "hi"})
            assert "no configured provider" in renamed.structured_content["error"], renamed.structured_content
        # The agent's own MCP endpoint serves just its tool.
        async with connect(node.url.removesuffix("/mcp") + "/agents/lonely/mcp") as own:
            assert await tool_names(own) == {"agents__lonely"}
            result = await own.call_tool("agents__lonely", {"task": "hi"})
            assert result.is_error and "no configured provider" in result.structured_content["error"]
    finally:
        node.stop()


def one_provider(model: ScriptedModel) -> str:
    return f"""
[providers.only]
api = "openai"
base_url = "{model.base_url}"
model = "m"
price_input = 1.0
price_output = 2.0
"""


def requests_of(model: ScriptedModel, instructions: str) -> list[dict[str, Any]]:
    """The requests one agent made (told apart by its system prompt)."""
    return [r for r in model.requests if r["messages"][0]["content"].startswith(instructions)]


async def test_delegation_carves_budgets_down_a_three_level_chain(concord: NodeFactory) -> None:
    model = ScriptedModel(
        [
            # A delegating model may invent a conversation id: the delegate starts a new one.
            {"call": ("agents__middle", {"task": "ask the leaf", "conversation_id": "invented"})},
            {"call": ("agents__leaf", {"task": "echo three times"})},
            {"call": ("fx__echo", {"message": "1"})},
            {"call": ("fx__echo", {"message": "2"})},
            {"call": ("fx__echo", {"message": "3"})},
            {"text": "never reached"},
        ]
    )
    config = one_provider(model) + """
[agents.top]
instructions = "TOP. Delegate to agents__middle."
tools = ["agents__middle"]
budget = { tokens = 1000 }

[agents.middle]
instructions = "MIDDLE. Delegate to agents__leaf."
tools = ["agents__leaf"]

[agents.leaf]
instructions = "LEAF. Echo with fx__echo."
tools = ["fx__echo"]
"""
    node = concord.start("agents-delegation", {"fx": fixture_server("fx")}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("agents__top", {"task": "go"})
        # Each turn costs 230 tokens. top: 230, leaves 770 for middle; middle: 230, leaves 540
        # for leaf; leaf: 3 turns = 690 >= 540, so its 4th model call is refused.
        assert len(requests_of(model, "TOP")) == 1
        assert len(requests_of(model, "MIDDLE")) == 1
        assert len(requests_of(model, "LEAF")) == 3, [r["messages"][0]["content"] for r in model.requests]
        assert len(model.requests) == 5, "nothing ran after the budget ran out"
        assert result.is_error
        answer = result.structured_content
        assert answer["ending"]["kind"] == "budget_exhausted", answer
        # top's spend includes what its delegates spent: 230 + 230 + 690.
        assert answer["usage"]["input_tokens"] + answer["usage"]["output_tokens"] == 1150, answer["usage"]
    finally:
        node.stop()
        model.close()


async def test_a_delegation_cycle_is_refused_with_the_chain(concord: NodeFactory) -> None:
    model = ScriptedModel(
        [
            {"call": ("agents__pong", {"task": "bounce"})},
            {"call": ("agents__ping", {"task": "bounce back"})},
            {"text": "pong saw the cycle"},
            {"text": "ping is done"},
        ]
    )
    config = one_provider(model) + """
[agents.ping]
instructions = "PING."
tools = ["agents__pong"]

[agents.pong]
instructions = "PONG."
tools = ["agents__ping"]
"""
    node = concord.start("agents-cycle", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("agents__ping", {"task": "start"})
        assert not result.is_error, result.structured_content
        assert result.structured_content["answer"] == "ping is done"
        pong_second = requests_of(model, "PONG.")[1]
        told = [m["content"] for m in pong_second["messages"] if m["role"] == "tool"]
        assert told == ["Error: delegation cycle refused: ping → pong → ping"], told
        ping_second = requests_of(model, "PING.")[1]
        assert [m["content"] for m in ping_second["messages"] if m["role"] == "tool"] == ["pong saw the cycle"]
    finally:
        node.stop()
        model.close()


async def test_a_workflow_is_a_tool_evaluator_optimizer(concord: NodeFactory) -> None:
    model = ScriptedModel(
        [
            {"text": "draft one"},
            {"text": "FAIL: too short"},
            {"text": "draft two, longer"},
            {"text": "PASS, good"},
        ]
    )
    config = one_provider(model) + """
[agents.writer]
instructions = "WRITER."

[agents.critic]
instructions = "CRITIC."

[workflows.polish]
kind = "evaluator"
description = "Write, review, rewrite until the critic passes it"
generator = "writer"
evaluator = "critic"
max_rounds = 3
"""
    node = concord.start("workflows", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            assert "workflows__polish" in await tool_names(client)
            result = await client.call_tool("workflows__polish", {"task": "Write a haiku."})
        assert not result.is_error, result.structured_content
        report = result.structured_content
        assert report["answer"] == "draft two, longer"
        assert [(s["agent"], s["label"]) for s in report["steps"]] == [
            ("writer", "draft 1"),
            ("critic", "review 1"),
            ("writer", "draft 2"),
            ("critic", "review 2"),
        ]
        rewrite = requests_of(model, "WRITER.")[1]["messages"][-1]["content"]
        assert "Reviewer feedback:\nFAIL: too short" in rewrite, rewrite
    finally:
        node.stop()
        model.close()


def auth_config(model: ScriptedModel, budget: str = "", tools: tuple[str, ...] | list[str] = ("fx__echo",)) -> str:
    """One provider, auth on, users may call agents and agents only `fx__echo`; the agent
    `worker` lists `tools`."""
    from test_governance import AUDIENCE, ISSUER, SECRET

    return one_provider(model) + f"""
[auth]
enabled = true
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
[[auth.keys]]
kid = "e2e"
algorithm = "HS256"
secret = "{SECRET}"

[policy]
[[policy.rules]]
name = "users-call-agents"
effect = "allow"
when = '"user" in principal.roles && server == "agents"'
[[policy.rules]]
name = "agents-echo-only"
effect = "allow"
when = 'principal.kind == "agent" && tool == "fx__echo"'
{budget}
[agents.worker]
instructions = "WORKER."
tools = {json.dumps(list(tools))}
"""


async def test_with_auth_on_an_agent_uses_only_the_tools_the_policy_gives_it(concord: NodeFactory) -> None:
    from test_governance import as_principal, token_for

    model = ScriptedModel(
        [
            {"call": ("fx__log", {"message": "sneaky"})},
            {"call": ("fx__echo", {"message": "allowed"})},
            {"text": "done"},
        ]
    )
    config = auth_config(model, tools=["fx__echo", "fx__log"])
    node = concord.start("agents-policy", {"fx": fixture_server("fx")}, extra_config=config)
    try:
        async with as_principal(node.url, token_for("alice", ["user"])) as client:
            result = await client.call_tool("agents__worker", {"task": "log then echo"})
        assert not result.is_error, result.structured_content
        first, second = model.requests[0], model.requests[1]
        # The model never saw fx__log: the policy gives agents fx__echo only.
        assert [t["function"]["name"] for t in first["tools"]] == ["fx__echo"], first["tools"]
        told = [m["content"] for m in second["messages"] if m["role"] == "tool"]
        assert told[0].startswith("Error: there is no tool named \"fx__log\""), told
        assert result.structured_content["tool_calls"] == 1
    finally:
        node.stop()
        model.close()


async def test_a_cost_aware_agent_asks_the_cheapest_satisfying_provider_first(concord: NodeFactory) -> None:
    pricey, cheap = ScriptedModel([{"text": "from pricey"}]), ScriptedModel([{"text": "from cheap"}])
    config = f"""
[providers.pricey]
api = "openai"
base_url = "{pricey.base_url}"
model = "big"
tags = ["remote", "big"]
price_input = 10.0
price_output = 30.0

[providers.cheap]
api = "openai"
base_url = "{cheap.base_url}"
model = "small"
tags = ["remote"]
price_input = 0.1
price_output = 0.4

[agents.thrifty]
instructions = "Answer."
provider = {{ tags = ["remote", "+big"] }}  # pricey ranks first by tags...
cost_aware = true                            # ...but the cheaper one is asked first
"""
    node = concord.start("agents-cost", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("agents__thrifty", {"task": "hi"})
        assert result.structured_content["answer"] == "from cheap"
        assert len(cheap.requests) == 1 and not pricey.requests
    finally:
        node.stop()
        pricey.close()
        cheap.close()


async def test_the_ledger_and_conversations_are_in_the_store_for_every_node(
    concord: NodeFactory, postgres_url: str
) -> None:
    model = ScriptedModel(
        [
            {"call": ("agents__leaf", {"task": "help"})},
            {"text": "leaf done"},
            {"text": "top done"},
            {"text": "top remembers"},
        ]
    )
    config = one_provider(model) + """
[agents.top]
instructions = "TOP."
tools = ["agents__leaf"]

[agents.leaf]
instructions = "LEAF."
"""
    first = concord.start("ledger-a", {}, extra_config=config, store=postgres_url)
    second = concord.start("ledger-b", {}, extra_config=config, store=postgres_url)
    try:
        async with connect(first.url) as client:
            result = await client.call_tool("agents__top", {"task": "go"})
        assert result.structured_content["answer"] == "top done"
        top_run = result.structured_content["run_id"]
        first.stop()
        # Another node on the same PostgreSQL sees every attempt, after the first one stopped.
        with urllib.request.urlopen(f"{second.url.removesuffix('/mcp')}/api/v1/usage", timeout=10) as response:
            usage = json.loads(response.read())
        rows = usage["records"]
        assert [(r["agent"], r["run_id"] == top_run) for r in rows] == [("leaf", False), ("top", True), ("top", True)], rows
        assert rows[0]["parent_run"] == top_run, "the delegated run names its parent"
        assert "parent_run" not in rows[1]
        assert usage["totals"]["calls"] == 3 and usage["totals"]["input_tokens"] == 600

        # The conversation continues on the other node: its turns are in the store too.
        conversation = result.structured_content["conversation_id"]
        async with connect(second.url) as client:
            again = await client.call_tool("agents__top", {"task": "and then?", "conversation_id": conversation})
            assert again.structured_content["answer"] == "top remembers", again.structured_content
            # A conversation is with one agent: another agent does not know the id.
            other = await client.call_tool("agents__leaf", {"task": "hi", "conversation_id": conversation})
            assert other.is_error and "unknown or expired conversation_id" in other.structured_content["error"]
        seen = [(m["role"], m.get("content")) for m in model.requests[-1]["messages"]]
        assert ("user", "go") in seen and ("assistant", "top done") in seen and seen[-1] == ("user", "and then?"), seen
    finally:
        second.stop()
        model.close()


async def test_an_agents_spend_settles_against_its_callers_standing_budget(concord: NodeFactory) -> None:
    """The agent's tool calls go through the gateway's pipeline as the agent (audited, on behalf
    of its caller), and its model tokens are charged to the caller's standing budget: a second
    run gets only what is left, and once it is gone the next call is refused at the door."""
    from test_governance import as_principal, audit_until, token_for

    model = ScriptedModel(
        [
            {"call": ("fx__echo", {"message": "budgeted"})},
            {"text": "first done"},
            {"call": ("fx__echo", {"message": "over budget"})},
            {"text": "never reached"},
        ]
    )
    budget = """
[budgets.principals.alice]
tokens = 500
"""
    node = concord.start("agents-standing-budget", {"fx": fixture_server("fx")}, extra_config=auth_config(model, budget))
    try:
        async with as_principal(node.url, token_for("alice", ["user"])) as client:
            first = await client.call_tool("agents__worker", {"task": "echo then answer"})
            assert not first.is_error, first.structured_content
            # Two model turns of 230 tokens each, charged to alice's budget as they happened: 40 of
            # her 500 are left.
            usage = first.structured_content["usage"]
            assert (usage["input_tokens"], usage["output_tokens"]) == (400, 60), usage
            assert first.meta["concord/budget"]["remaining"]["tokens"] == 40, first.meta

            second = await client.call_tool("agents__worker", {"task": "again"})
            # 40 tokens were left: one model turn spends them, and the run stops there.
            assert second.is_error and second.structured_content["ending"]["kind"] == "budget_exhausted", (
                second.structured_content
            )
            assert second.structured_content["ending"]["budget"] == "tokens (the caller's budget has none left)"
            assert len(model.requests) == 3
            # Each turn may write at most what is left: 500, then 270, then the 40 left.
            assert [r.get("max_tokens") for r in model.requests] == [500, 270, 40], model.requests

            with pytest.raises(MCPError) as refused:
                await client.call_tool("agents__worker", {"task": "once more"})
            assert refused.value.error.code == -32030
            assert "tokens budget exhausted: the standing budget of alice allows 500 tokens" in refused.value.error.message
            assert len(model.requests) == 3, "a refused call reaches no model"

        # The agent's tool call is in the audit trail as the agent, on alice's behalf.
        def echo_and_two_runs(entries: list[dict[str, Any]]) -> bool:
            echo = [e for e in entries if e["kind"] == "tool_call" and e["data"].get("tool") == "echo"]
            runs = [e for e in entries if e["kind"] == "tool_call" and e["data"].get("server") == "agents"]
            return bool(echo) and len(runs) >= 2

        _, entries = audit_until(node, echo_and_two_runs, "the agent's tool call and both runs in the audit trail")
        echo = [e for e in entries if e["kind"] == "tool_call" and e["data"].get("tool") == "echo"]
        runs = [e for e in entries if e["kind"] == "tool_call" and e["data"].get("server") == "agents"]
        assert echo and echo[0]["principal"] == "agent:worker", echo
        assert echo[0]["data"]["chain"] == ["alice", "agent:worker"], echo[0]
        assert [r["principal"] for r in runs] == ["alice", "alice"], runs
        refusals = [e for e in entries if e["kind"] == "budget_exhausted" and e["principal"] == "alice"]
        assert refusals, entries[-5:]
    finally:
        node.stop()
        model.close()


async def test_cancelling_an_agent_cancels_its_tool_call_upstream(concord: NodeFactory) -> None:
    import anyio

    from conftest import eventually

    model = ScriptedModel([{"call": ("fx__slow", {"steps": 100})}, {"text": "never reached"}])
    config = one_provider(model) + """
[agents.waiter]
instructions = "WAITER."
tools = ["fx__slow"]
"""
    node = concord.start("agents-cancel", {"fx": fixture_server("fx")}, extra_config=config)
    try:
        async with connect(node.url) as client:
            before = (await client.call_tool("fx__stats", {})).structured_content
            calling = anyio.Event()
            outcome: dict[str, Any] = {}

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                if message == "calling fx__slow":
                    calling.set()

            scope = anyio.CancelScope()

            async def run_agent() -> None:
                with scope:
                    outcome["result"] = await client.call_tool(
                        "agents__waiter", {"task": "wait"}, progress_callback=on_progress
                    )

            polls = 0

            async def slow_call_in_flight() -> bool:
                # Every tools/call counts, these polls included: one more means fx__slow arrived.
                nonlocal polls
                polls += 1
                stats = (await client.call_tool("fx__stats", {})).structured_content
                return stats["calls"] - before["calls"] - polls >= 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_agent)
                with anyio.fail_after(10):
                    await calling.wait()
                await eventually(slow_call_in_flight, timeout=10, interval=0.05, what="fx__slow to be running")
                scope.cancel()  # the SDK sends notifications/cancelled for agents__waiter
            assert "result" not in outcome and scope.cancelled_caught

            async def upstream_saw_cancel() -> dict[str, Any] | None:
                stats = (await client.call_tool("fx__stats", {})).structured_content
                return stats if len(stats["cancelled"]) > len(before["cancelled"]) else None

            stats = await eventually(upstream_saw_cancel, timeout=5, interval=0.1, what="fx to get notifications/cancelled")
            assert len(stats["cancelled"]) == len(before["cancelled"]) + 1, stats
        assert len(model.requests) == 1, "the loop stopped: no model call after the cancellation"
    finally:
        node.stop()
        model.close()


async def test_an_agent_picks_tools_by_tags_through_the_mesh(
    concord: NodeFactory, replicas: list[Any]  # noqa: F811 - the fixture imported above
) -> None:
    """Tool selectors resolve over configured servers (their `capabilities` and `tags`) and
    servers registered in the mesh alike; names still work beside them."""
    from conftest import eventually

    model = ScriptedModel([{"text": "looked at my tools"}])
    config = one_provider(model) + f"""
[registry.finder]
version = "2.0.0"
kind = "server"
capabilities = ["search"]
tags = ["prod"]
endpoint = {{ url = "http://127.0.0.1:{replicas[0].port}/mcp" }}

[agents.picker]
instructions = "PICKER."
tools = [{{ tags = ["sandbox", "-retired"] }}, {{ capability = "search", tags = ["prod"] }}, "fy__echo"]
"""
    servers = {
        "fx": fixture_server("fx", tags=["sandbox"]),
        "fy": fixture_server("fy", tags=["prod"], capabilities=["echo"]),
        "old": fixture_server("old", tags=["sandbox", "retired"]),
    }
    node = concord.start("agents-tool-tags", servers, extra_config=config)
    try:
        async with connect(node.url) as client:

            async def everything_routed() -> bool:
                names = await tool_names(client)
                return {"finder__echo", "fx__echo", "fy__echo", "old__echo"} <= names

            await eventually(everything_routed, timeout=15, what="the configured and registered servers' tools")
            all_tools = await tool_names(client)
            result = await client.call_tool("agents__picker", {"task": "what can you use?"})
        assert not result.is_error, result.structured_content
        offered = {t["function"]["name"] for t in model.requests[0]["tools"]}
        expected = {n for n in all_tools if n.startswith(("fx__", "finder__"))} | {"fy__echo"}
        assert offered == expected, sorted(offered ^ expected)

        # The selectors are the agent's dependencies, resolved like any other.
        assert "tools_2: finder" in deps_show(node, "picker")
    finally:
        node.stop()
        model.close()


async def test_concurrent_runs_of_one_principal_share_its_budget_turn_by_turn(concord: NodeFactory) -> None:
    """Every model turn is charged to the caller's standing budget as it happens, so two runs at
    once stop when their spending together reaches it: at most one turn each in flight past it."""
    import anyio

    from test_governance import as_principal, token_for

    model = ScriptedModel([{"call": ("fx__echo", {"message": str(n)})} for n in range(12)])
    budget = """
[budgets.principals.alice]
tokens = 500
"""
    node = concord.start("agents-shared-budget", {"fx": fixture_server("fx")}, extra_config=auth_config(model, budget))
    try:
        results: list[Any] = []
        async with as_principal(node.url, token_for("alice", ["user"])) as client:

            async def one_run(task: str) -> None:
                results.append(await client.call_tool("agents__worker", {"task": task}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one_run, "first")
                tg.start_soon(one_run, "second")
        endings = sorted(r.structured_content["ending"].get("budget", "") for r in results)
        assert endings == ["tokens (the caller's budget has none left)"] * 2, [r.structured_content for r in results]
        # 230 tokens a turn; a turn starts only while the 500 are not spent, so at most two turns
        # are charged before that and one more per run can be in flight: 4 in all. Each run given
        # its own 500 would have taken 3 turns: 6.
        assert len(model.requests) <= 4, len(model.requests)
        turns = sum(r.structured_content["iterations"] for r in results)
        assert turns == len(model.requests)
    finally:
        node.stop()
        model.close()

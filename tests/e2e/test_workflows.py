"""Workflows over agents through a real node: `[workflows.NAME]` of kinds router, parallel and
orchestrator become the tools `workflows__NAME`, called with the official MCP SDK. Every agent
runs its real loop against one fake OpenAI-compatible server (real wire format) that tells the
agents apart by their system prompt (`AGENT:name.`), answers per agent, and records every request
and the order in which requests arrived and answers were given. What ran, in which order and with
which context is asserted on those records (and on the usage ledger), never on timing: the
parallel branches must all be in flight at once because the fake model holds every branch's
answer until all of them have asked (a barrier whose timeout only guards against a hang)."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from conftest import Node, NodeFactory, connect, free_port, tool_names

pytestmark = pytest.mark.anyio

# How long the fake model waits for the other parallel requests before it gives up: a guard
# against hanging the suite if the node serialises them, not a timing threshold (a broken
# barrier is reported as such, and the test fails on it).
BARRIER_GUARD = 60.0
BROKEN = "BARRIER BROKEN: the other requests never arrived while this one was waiting"

AGENT_RE = re.compile(r"^AGENT:(\w+)\.")


class AgentModel:
    """A fake `/v1/chat/completions` endpoint for many agents at once. Each request is
    attributed to an agent by its system prompt (`AGENT:name. ...`) and answered with
    `respond(agent, task)` (text, i.e. a final answer). Records every request and an event log
    of ("request", agent, task) when one arrives and ("answer", agent, task) just before its
    answer is written, so the log orders what the node could have known when it asked."""

    def __init__(self, respond: Callable[[str, str], str]) -> None:
        self.respond = respond
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                agent, task = agent_of(body), task_of(body)
                with model.lock:
                    model.requests.append(body)
                    model.events.append(("request", agent, task))
                    model.in_flight += 1
                    model.peak_in_flight = max(model.peak_in_flight, model.in_flight)
                try:
                    text = model.respond(agent, task)
                except Exception as e:  # noqa: BLE001 - reported to the node, and so to the test
                    text = f"FAKE MODEL ERROR: {e!r}"
                with model.lock:
                    model.events.append(("answer", agent, task))
                    model.in_flight -= 1
                data = json.dumps(
                    {
                        "id": "chatcmpl-wf",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "fake-1",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                    }
                ).encode()
                self.send_response(200)
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

    def mark(self) -> int:
        """Where the request log is now: `asked(since=mark)` lists what came after."""
        with self.lock:
            return len(self.requests)

    def asked(self, since: int = 0) -> list[tuple[str, str]]:
        """(agent, task) of every request after `since`, in arrival order."""
        with self.lock:
            return [(agent_of(r), task_of(r)) for r in self.requests[since:]]

    def index(self, kind: str, agent: str, task_start: str = "") -> int:
        """Position in the event log of the one `kind` event of `agent` whose task starts so."""
        with self.lock:
            hits = [
                i
                for i, (k, a, t) in enumerate(self.events)
                if k == kind and a == agent and t.startswith(task_start)
            ]
        assert len(hits) == 1, f"expected one {kind} of {agent} ({task_start!r}): {self.events}"
        return hits[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]
    assert system["role"] == "system", body["messages"]
    found = AGENT_RE.match(system["content"])
    assert found, f"a request from an agent without an AGENT: prompt: {system['content']!r}"
    return found.group(1)


def task_of(body: dict[str, Any]) -> str:
    """The task the agent was given: the (only) user message of a fresh run."""
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    assert len(users) == 1, body["messages"]
    return users[0]


def provider_and_agents(model: AgentModel, *names: str) -> str:
    config = f"""
[providers.fake]
api = "openai"
base_url = "{model.base_url}"
model = "fake-1"
price_input = 1.0
price_output = 2.0
"""
    for name in names:
        config += f'\n[agents.{name}]\ninstructions = "AGENT:{name}. Answer briefly."\nmax_iterations = 2\n'
    return config


def usage_by_agent(node: Node) -> Counter[str]:
    """Model calls per agent in the node's usage ledger (`GET /api/v1/usage`)."""
    with urllib.request.urlopen(f"{node.base_url}/api/v1/usage", timeout=10) as response:
        usage = json.loads(response.read())
    assert usage["totals"]["failed"] == 0, usage
    return Counter(r["agent"] for r in usage["records"])


def steps_of(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["agent"], s["label"]) for s in report["steps"]]


# --------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------

ROUTER_CONFIG = """
[workflows.triage]
kind = "router"
description = "One agent for the task"
routes = [{ contains = ["invoice", "refund"], agent = "billing" }]
router_agent = "dispatcher"
agents = ["billing", "shipping", "support"]
fallback = "support"
"""


@pytest.fixture
def router_node(concord: NodeFactory) -> Iterator[tuple[Node, AgentModel, list[str]]]:
    # The dispatcher's picks, in order (the model's choice, which the router must follow).
    picks: list[str] = []
    nonce = uuid.uuid4().hex[:8]

    def respond(agent: str, task: str) -> str:
        if agent == "dispatcher":
            return picks.pop(0)
        return f"{agent} handled it ({nonce})"

    model = AgentModel(respond)
    config = provider_and_agents(model, "dispatcher", "billing", "shipping", "support") + ROUTER_CONFIG
    node = concord.start("workflows-router", {}, extra_config=config)
    try:
        yield node, model, picks
    finally:
        node.stop()
        model.close()


async def test_router_follows_a_rule_then_the_router_agents_pick_then_the_fallback(
    router_node: tuple[Node, AgentModel, list[str]],
) -> None:
    node, model, picks = router_node
    async with connect(node.url) as client:
        assert {"workflows__triage", "agents__billing"} <= await tool_names(client)

        # 1. Every word of the rule appears (case-insensitively): billing, without asking anyone.
        task = "Please REFUND the invoice 42"
        before = model.mark()
        result = await client.call_tool("workflows__triage", {"task": task})
        assert not result.is_error, result.structured_content
        report = result.structured_content
        assert model.asked(before) == [("billing", task)], "only billing ran, on the task as given"
        assert steps_of(report) == [("billing", "answer")]
        assert report["answer"] == report["steps"][0]["answer"] and report["answer"].startswith("billing handled it")

        # 2. Only one of the rule's words: no rule matches, so the dispatcher picks among the
        # agents, and only the one it named runs.
        picks.append("shipping")
        task = "Where is the parcel for invoice 7?"
        before = model.mark()
        result = await client.call_tool("workflows__triage", {"task": task})
        assert not result.is_error, result.structured_content
        report = result.structured_content
        asked = model.asked(before)
        assert [agent for agent, _ in asked] == ["dispatcher", "shipping"], asked
        question = asked[0][1]
        assert "billing, shipping, support" in question and question.endswith(f"Task: {task}"), question
        assert asked[1][1] == task, "the chosen agent gets the task itself, not the routing question"
        assert steps_of(report) == [("dispatcher", "route"), ("shipping", "answer")]
        assert report["steps"][0]["answer"] == "shipping"
        assert report["answer"].startswith("shipping handled it"), report

        # 3. The dispatcher names no known agent: the fallback answers.
        picks.append("I would rather not say")
        task = "Something odd happened"
        before = model.mark()
        result = await client.call_tool("workflows__triage", {"task": task})
        assert not result.is_error, result.structured_content
        assert [agent for agent, _ in model.asked(before)] == ["dispatcher", "support"]
        assert steps_of(result.structured_content) == [("dispatcher", "route"), ("support", "answer")]

        missing = await client.call_tool("workflows__triage", {})
        assert missing.is_error and "missing argument: task" in missing.structured_content["error"]

    assert not picks, "every scripted pick was used"
    # The ledger shows each run: one model call per agent step, nothing for agents not chosen.
    assert usage_by_agent(node) == Counter({"dispatcher": 2, "billing": 1, "shipping": 1, "support": 1})


# --------------------------------------------------------------------------------------
# Parallel
# --------------------------------------------------------------------------------------

BRANCHES = ["optimist", "skeptic", "realist"]

PARALLEL_CONFIG = """
[workflows.ideas]
kind = "parallel"
agents = ["optimist", "skeptic", "realist"]
combine = "editor"

[workflows.raw_ideas]
kind = "parallel"
agents = ["optimist", "skeptic"]
"""


async def test_parallel_runs_every_branch_at_once_and_the_combiner_merges_them(concord: NodeFactory) -> None:
    nonce = uuid.uuid4().hex[:8]
    # Each branch's answer is held until every branch of the run has asked: the run can only
    # finish if all branches were in flight together.
    barrier = threading.Barrier(len(BRANCHES), timeout=BARRIER_GUARD)
    pair = threading.Barrier(2, timeout=BARRIER_GUARD)
    current = {"barrier": barrier}

    def respond(agent: str, task: str) -> str:
        if agent == "editor":
            return f"merged ({nonce})"
        try:
            current["barrier"].wait()
        except threading.BrokenBarrierError:
            return BROKEN
        return f"{agent} says {agent[::-1]} ({nonce})"

    model = AgentModel(respond)
    config = provider_and_agents(model, *BRANCHES, "editor") + PARALLEL_CONFIG
    node = concord.start("workflows-parallel", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            task = "Should we ship on Friday?"
            result = await client.call_tool("workflows__ideas", {"task": task})
            assert not result.is_error, result.structured_content
            report = result.structured_content
            branch_answers = {a: f"{a} says {a[::-1]} ({nonce})" for a in BRANCHES}

            asked = model.asked()
            # Every branch was asked exactly once, with the task itself; then the editor, once.
            assert sorted(asked[:3]) == sorted((a, task) for a in BRANCHES), asked
            assert [agent for agent, _ in asked[3:]] == ["editor"], asked
            assert model.peak_in_flight == len(BRANCHES), "all branches were in flight at once"
            assert not barrier.broken
            # The editor asked only after every branch had been answered, and was given them all.
            editor_asked = model.index("request", "editor")
            for agent in BRANCHES:
                assert model.index("answer", agent) < editor_asked, model.events
            combine_prompt = asked[3][1]
            assert combine_prompt.startswith("Combine these answers") and f"Task: {task}" in combine_prompt
            for agent in BRANCHES:
                assert f"[{agent}]\n{branch_answers[agent]}" in combine_prompt, combine_prompt

            # The report: one fan-out step per branch (in the configured order), then the fan-in,
            # whose answer is the workflow's.
            assert steps_of(report) == [(a, "fan-out") for a in BRANCHES] + [("editor", "fan-in")]
            assert [s["answer"] for s in report["steps"][:3]] == [branch_answers[a] for a in BRANCHES]
            assert report["answer"] == f"merged ({nonce})"

            # Without a combiner the answer is every branch's answer, labelled, in order.
            current["barrier"] = pair
            before = model.mark()
            raw = await client.call_tool("workflows__raw_ideas", {"task": "Tabs or spaces?"})
            assert not raw.is_error, raw.structured_content
            assert sorted(model.asked(before)) == [("optimist", "Tabs or spaces?"), ("skeptic", "Tabs or spaces?")]
            assert not pair.broken
            assert raw.structured_content["answer"] == (
                f"[optimist]\n{branch_answers['optimist']}\n\n[skeptic]\n{branch_answers['skeptic']}"
            )
            assert steps_of(raw.structured_content) == [("optimist", "fan-out"), ("skeptic", "fan-out")]

        assert usage_by_agent(node) == Counter({"optimist": 2, "skeptic": 2, "realist": 1, "editor": 1})
    finally:
        node.stop()
        model.close()


async def test_a_failing_branch_fails_the_parallel_workflow_and_names_it(concord: NodeFactory) -> None:
    """A branch whose model never gives a usable answer ends the workflow with an error that
    names the agent and the step, instead of a merged answer missing that branch."""

    def respond(agent: str, task: str) -> str:
        if agent == "skeptic":
            raise RuntimeError("unused")  # never called: skeptic's provider is unreachable
        return f"{agent} ok"

    model = AgentModel(respond)
    dead = free_port()  # nothing listens here
    config = provider_and_agents(model, "optimist", "editor") + f"""
[providers.dead]
api = "openai"
base_url = "http://127.0.0.1:{dead}/v1"
model = "gone"
tags = ["dead"]

[agents.skeptic]
instructions = "AGENT:skeptic. Doubt."
provider = {{ tags = ["dead"] }}

[workflows.ideas]
kind = "parallel"
agents = ["optimist", "skeptic"]
combine = "editor"
"""
    node = concord.start("workflows-parallel-failing", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("workflows__ideas", {"task": "Risky?"})
        assert result.is_error, result.structured_content
        error = result.structured_content["error"]
        assert error.startswith("agent skeptic failed at fan-out:"), error
        assert [agent for agent, _ in model.asked()] == ["optimist"], "the editor never ran"
    finally:
        node.stop()
        model.close()


# --------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------

ORCHESTRATOR_CONFIG = """
[workflows.build]
kind = "orchestrator"
workers = [
  { agent = "developer", capabilities = ["code"], max_concurrency = 2 },
  { agent = "qa", capabilities = ["test"], max_concurrency = 1 },
]
tasks = [
  { id = "release", capability = "code", task = "Write the release notes.", depends_on = ["tests"] },
  { id = "tests", capability = "test", task = "Test both.", depends_on = ["api", "cli"] },
  { id = "api", capability = "code", task = "Write the API module." },
  { id = "cli", capability = "code", task = "Write the CLI." },
]
"""


async def test_orchestrator_runs_the_dag_in_dependency_order_passing_results_on(concord: NodeFactory) -> None:
    nonce = uuid.uuid4().hex[:8]
    # api and cli are independent and the developer takes two at once: their answers are held
    # until both have asked.
    both_code_tasks = threading.Barrier(2, timeout=BARRIER_GUARD)
    answers = {
        "Write the API module.": f"api.rs written ({nonce})",
        "Write the CLI.": f"cli.rs written ({nonce})",
        "Test both.": f"all 12 tests pass ({nonce})",
        "Write the release notes.": f"v1.0 notes ({nonce})",
    }

    def respond(agent: str, task: str) -> str:
        first_line = task.split("\n", 1)[0]
        if first_line in ("Write the API module.", "Write the CLI."):
            try:
                both_code_tasks.wait()
            except threading.BrokenBarrierError:
                return BROKEN
        return answers[first_line]

    model = AgentModel(respond)
    config = provider_and_agents(model, "developer", "qa") + ORCHESTRATOR_CONFIG
    node = concord.start("workflows-orchestrator", {}, extra_config=config)
    goal = "Ship the tool"
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("workflows__build", {"task": goal})
        assert not result.is_error, result.structured_content
        report = result.structured_content

        prompts = {task.split("\n", 1)[0]: (agent, task) for agent, task in model.asked()}
        assert len(model.requests) == 4 and len(prompts) == 4, model.asked()
        # Each task went to a worker with its capability.
        assert {first: agent for first, (agent, _) in prompts.items()} == {
            "Write the API module.": "developer",
            "Write the CLI.": "developer",
            "Test both.": "qa",
            "Write the release notes.": "developer",
        }
        # Every prompt carries the overall goal; the independent tasks get no other context.
        for first, (_, prompt) in prompts.items():
            assert f"\n\nOverall goal: {goal}" in prompt, prompt
        assert prompts["Write the API module."][1] == f"Write the API module.\n\nOverall goal: {goal}"
        assert prompts["Write the CLI."][1] == f"Write the CLI.\n\nOverall goal: {goal}"
        # A dependent task gets the results of its own dependencies (in depends_on order), and
        # only those: these answers exist only once the model has given them, so their presence
        # proves the order.
        assert prompts["Test both."][1] == (
            f"Test both.\n\nOverall goal: {goal}"
            f"\n\nResult of api:\n{answers['Write the API module.']}"
            f"\n\nResult of cli:\n{answers['Write the CLI.']}"
        )
        assert prompts["Write the release notes."][1] == (
            f"Write the release notes.\n\nOverall goal: {goal}\n\nResult of tests:\n{answers['Test both.']}"
        )
        # The order in the fake model's log: both code tasks in flight together (max_concurrency 2),
        # qa asked only after both were answered, the release only after qa was answered.
        assert not both_code_tasks.broken and model.peak_in_flight == 2
        tests_asked = model.index("request", "qa")
        assert model.index("answer", "developer", "Write the API module.") < tests_asked
        assert model.index("answer", "developer", "Write the CLI.") < tests_asked
        assert model.index("answer", "qa") < model.index("request", "developer", "Write the release notes.")

        # The report: each step as it finished, and the answer of the task nothing depends on.
        labels = [label for _, label in steps_of(report)]
        assert sorted(labels[:2]) == ["api", "cli"] and labels[2:] == ["tests", "release"], labels
        assert dict((s["label"], s["answer"]) for s in report["steps"]) == {
            "api": answers["Write the API module."],
            "cli": answers["Write the CLI."],
            "tests": answers["Test both."],
            "release": answers["Write the release notes."],
        }
        assert report["answer"] == answers["Write the release notes."]
        assert usage_by_agent(node) == Counter({"developer": 3, "qa": 1})
    finally:
        node.stop()
        model.close()


async def test_a_worker_with_one_slot_takes_its_tasks_one_at_a_time(concord: NodeFactory) -> None:
    """Two independent tasks for a worker with max_concurrency 1: the second is asked only after
    the first was answered (never both in flight), and the later finals are joined in DAG order."""

    def respond(agent: str, task: str) -> str:
        return "done: " + task.split("\n", 1)[0]

    model = AgentModel(respond)
    config = provider_and_agents(model, "solo") + """
[workflows.chores]
kind = "orchestrator"
workers = [{ agent = "solo", capabilities = ["chore"] }]
tasks = [
  { id = "dishes", capability = "chore", task = "Do the dishes." },
  { id = "laundry", capability = "chore", task = "Do the laundry." },
]
"""
    node = concord.start("workflows-orchestrator-one-slot", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("workflows__chores", {"task": "Tidy up"})
        assert not result.is_error, result.structured_content
        assert model.peak_in_flight == 1
        kinds = [kind for kind, _, _ in model.events]
        assert kinds == ["request", "answer", "request", "answer"], model.events
        assert result.structured_content["answer"] == "done: Do the dishes.\n\ndone: Do the laundry."
    finally:
        node.stop()
        model.close()


async def test_independent_tasks_spread_over_the_least_loaded_workers(concord: NodeFactory) -> None:
    """Two workers with the same capability and two slots each: two independent tasks go one to
    each (the least loaded), and run at once."""
    together = threading.Barrier(2, timeout=BARRIER_GUARD)

    def respond(agent: str, task: str) -> str:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return BROKEN
        return f"{agent} did " + task.split("\n", 1)[0]

    model = AgentModel(respond)
    config = provider_and_agents(model, "alpha", "beta") + """
[workflows.split]
kind = "orchestrator"
workers = [
  { agent = "alpha", capabilities = ["code"], max_concurrency = 2 },
  { agent = "beta", capabilities = ["code"], max_concurrency = 2 },
]
tasks = [
  { id = "one", capability = "code", task = "Task one." },
  { id = "two", capability = "code", task = "Task two." },
]
"""
    node = concord.start("workflows-orchestrator-spread", {}, extra_config=config)
    try:
        async with connect(node.url) as client:
            result = await client.call_tool("workflows__split", {"task": "Split it"})
        assert not result.is_error, result.structured_content
        assert not together.broken and model.peak_in_flight == 2
        assert sorted(model.asked()) == [
            ("alpha", "Task one.\n\nOverall goal: Split it"),
            ("beta", "Task two.\n\nOverall goal: Split it"),
        ], "the first task to the first worker, the second to the one with nothing to do"
        assert result.structured_content["answer"] == "alpha did Task one.\n\nbeta did Task two."
    finally:
        node.stop()
        model.close()

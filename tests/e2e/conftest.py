"""Shared fixtures for Concord's end-to-end suite.

Everything here drives real processes: the `concord` binary, the `concord-fixture` fault
server, and the reference MCP servers installed from npm under tests/peers. A missing
binary or package makes the suite FAIL (never skip): see `_require`.

Nodes are started through the session-scoped `concord` fixture (a `NodeFactory`): it writes
a config file into a fresh tmp dir, runs `concord up` on a free port with its stderr in a
log file inside that dir, and waits for `GET /readyz` to answer 200. `Node.stop()` sends
SIGTERM and asserts that the node exits within 10 s and that none of its upstream processes
survive it. The logs of every live node (and of the npm servers this file starts) are
attached to the report of any failing test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import Tool

# --------------------------------------------------------------------------------------
# Paths: the binaries under test and the npm peers, in one place.
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
CONCORD_BIN = REPO / "target" / "debug" / "concord"
FIXTURE_BIN = REPO / "target" / "debug" / "concord-fixture"

PEERS = REPO / "tests" / "peers" / "node_modules"
NPM_SCOPE = PEERS / "@modelcontextprotocol"
EVERYTHING_JS = NPM_SCOPE / "server-everything" / "dist" / "index.js"
FILESYSTEM_JS = NPM_SCOPE / "server-filesystem" / "dist" / "index.js"
MEMORY_JS = NPM_SCOPE / "server-memory" / "dist" / "index.js"
INSPECTOR_BIN = PEERS / ".bin" / "mcp-inspector"
NODE_BIN = "node"

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

# The Python SDK's default `mode="auto"` negotiates the 2026-07-28 protocol with Concord.
# Most tests pin the handshake-era protocol (2025-11-25, what deployed clients speak) so
# that they exercise the gateway's features; `test_gateway.py::
# test_default_sdk_client_2026_protocol` covers the default mode on its own.
CLIENT_MODE = "legacy"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(
            f"{what} is missing: {path}. Build with `cargo build --workspace --bins` and install "
            f"the npm peers in tests/peers (`npm ci`).",
            pytrace=False,
        )
    return path


def _which(program: str) -> str:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"`{program}` is not on PATH; the npm MCP servers need Node.js", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def dependencies() -> None:
    """Fails the whole session up front when a binary or npm package is missing."""
    _require(CONCORD_BIN, "the concord binary")
    _require(FIXTURE_BIN, "the concord-fixture binary")
    _require(EVERYTHING_JS, "@modelcontextprotocol/server-everything")
    _require(FILESYSTEM_JS, "@modelcontextprotocol/server-filesystem")
    _require(MEMORY_JS, "@modelcontextprotocol/server-memory")
    _require(INSPECTOR_BIN, "@modelcontextprotocol/inspector")
    _which(NODE_BIN)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Polls `predicate` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled predicates may fail until ready
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} (last error: {last_error!r})")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Async `wait_until`: awaits `predicate()` until truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = await predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} (last error: {last_error!r})")
        await anyio.sleep(interval)


class Rendezvous:
    """Holds each of `parties` callers in `wait()` until all of them have arrived (fails after
    `timeout` seconds otherwise). A client callback that waits here shows that the requests of
    several clients were at the gateway at the same time, without a pause that hopes so."""

    def __init__(self, parties: int, timeout: float = 30.0) -> None:
        self.parties = parties
        self.timeout = timeout
        self.arrived = 0
        self.everyone = anyio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.everyone.set()
        with anyio.fail_after(self.timeout):
            await self.everyone.wait()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sole_error(group: BaseExceptionGroup) -> Exception | None:
    """The one ordinary exception inside (nested) single-member groups, if that is all there is."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    if isinstance(group, Exception) and not isinstance(group, BaseExceptionGroup):
        return group
    return None


@asynccontextmanager
async def connect(server: str | StdioServerParameters, **kwargs: Any) -> AsyncIterator[Client]:
    """An MCP SDK client for a node's streamable HTTP endpoint (or a stdio command), without
    the response cache so that every list goes to the node.

    An assertion failing inside `async with connect(...)` surfaces as itself rather than
    wrapped in the ExceptionGroup of the SDK's task group."""
    kwargs.setdefault("mode", CLIENT_MODE)
    kwargs.setdefault("cache", None)
    try:
        async with Client(server, **kwargs) as client:
            yield client
    except BaseExceptionGroup as group:
        sole = _sole_error(group)
        if sole is None:
            raise
        raise sole from None


async def list_all_tools(client: Client) -> list[Tool]:
    """tools/list, following `nextCursor` to the end."""
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(100):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            return tools
    raise AssertionError("tools/list never ended (100 pages)")


async def tool_names(client: Client) -> set[str]:
    return {t.name for t in await list_all_tools(client)}


def text_of(result: Any) -> str:
    """The concatenated text content blocks of a CallToolResult / GetPromptResult message."""
    return "\n".join(getattr(block, "text", "") for block in result.content)


# --------------------------------------------------------------------------------------
# Process bookkeeping (/proc)
# --------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


@dataclass(frozen=True)
class ProcIdentity:
    """A process, identified by pid and start time so that pid reuse cannot fool a check."""

    pid: int
    starttime: int
    cmd: str

    @classmethod
    def of(cls, pid: int) -> ProcIdentity | None:
        stat = _stat(pid)
        if stat is None:
            return None
        return cls(pid, stat[2], cmdline(pid))

    def alive(self) -> bool:
        stat = _stat(self.pid)
        # A zombie has exited; it only waits for a parent (here possibly a non-reaping init).
        return stat is not None and stat[2] == self.starttime and stat[0] != "Z"


def pid_alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(root: int) -> set[ProcIdentity]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[ProcIdentity] = set()
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        ident = ProcIdentity.of(pid)
        if ident is not None and ident.alive():
            found.add(ident)
        stack.extend(children.get(pid, []))
    return found


def processes_mentioning(text: str) -> set[ProcIdentity]:
    found = set()
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        if text in cmdline(pid):
            ident = ProcIdentity.of(pid)
            if ident is not None and ident.alive():
                found.add(ident)
    return found


# --------------------------------------------------------------------------------------
# Logs of live processes, attached to failing tests
# --------------------------------------------------------------------------------------

_LIVE_LOGS: dict[str, Path] = {}


def _tail(path: Path, max_chars: int = 12000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for label, path in list(_LIVE_LOGS.items()):
            report.sections.append((f"log: {label} ({path})", _tail(path)))


# --------------------------------------------------------------------------------------
# Config writing
# --------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(servers: dict[str, dict[str, Any]], health_interval: str) -> str:
    lines = ["[node]", f"health_interval = {_toml_value(health_interval)}", ""]
    for name, spec in servers.items():
        lines.append(f"[servers.{name}]")
        for key, value in spec.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def stdio_server(command: str | Path, *args: str | Path, **extra: Any) -> dict[str, Any]:
    return {"command": str(command), "args": [str(a) for a in args], **extra}


def fixture_server(name: str, *flags: str, **extra: Any) -> dict[str, Any]:
    return stdio_server(FIXTURE_BIN, "--name", name, *flags, **extra)


# --------------------------------------------------------------------------------------
# Concord nodes
# --------------------------------------------------------------------------------------


@dataclass
class Node:
    """One running `concord up` process."""

    label: str
    directory: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    stdout_path: Path
    stopped: bool = field(default=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    def log(self) -> str:
        return _tail(self.log_path, 50000)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = http_get(f"{self.base_url}/readyz")
        return status, json.loads(body)

    def server_status(self, name: str) -> dict[str, Any]:
        _, body = self.readyz()
        for server in body["servers"]:
            if server["name"] == name:
                return server
        raise AssertionError(f"/readyz does not list server {name!r}: {body}")

    def metrics(self) -> str:
        status, body = http_get(f"{self.base_url}/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:500]}"
        return body

    def upstream_processes(self) -> set[ProcIdentity]:
        """The node's child processes (upstream servers) and anything they started, plus any
        process whose command line mentions this node's private directory."""
        mentioning = processes_mentioning(f"{self.directory}/")
        return descendants(self.proc.pid) | {p for p in mentioning if p.pid != self.proc.pid}

    def stop(self) -> None:
        """SIGTERM; asserts a clean exit within 10 s and no surviving upstream process."""
        if self.stopped:
            return
        self.stopped = True
        before = self.upstream_processes()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            _kill_all(before)
            _LIVE_LOGS.pop(self.label, None)
            raise AssertionError(
                f"concord node {self.label!r} did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log()}"
            )
        _LIVE_LOGS.pop(self.label, None)
        # Children are reaped by the node before it exits; give an orphan a moment anyway so
        # that a slow-but-dying process is not reported, then insist.
        deadline = time.monotonic() + 2.0
        survivors = {p for p in before if p.alive()} | processes_mentioning(f"{self.directory}/")
        while survivors and time.monotonic() < deadline:
            time.sleep(0.05)
            survivors = {p for p in survivors if p.alive()}
        _kill_all(survivors)
        assert not survivors, (
            f"upstream processes survived the node {self.label!r}: "
            + ", ".join(f"{p.pid} ({p.cmd})" for p in survivors)
            + f"\n{self.log()}"
        )
        assert code == 0, f"concord node {self.label!r} exited with {code} after SIGTERM\n{self.log()}"

    def kill(self) -> None:
        """Teardown of last resort (after a failed start or a failed test)."""
        if self.proc.poll() is None:
            procs = self.upstream_processes()
            self.proc.kill()
            self.proc.wait(timeout=5)
            _kill_all(procs)
        self.stopped = True
        _LIVE_LOGS.pop(self.label, None)


def _kill_all(procs: set[ProcIdentity]) -> None:
    for p in procs:
        if p.alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class NodeFactory:
    """Starts Concord nodes in private tmp dirs; stops whatever is left at session end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._nodes: list[Node] = []

    def new_dir(self, label: str) -> Path:
        return self._tmp.mktemp(label)

    def start(
        self,
        label: str,
        servers: dict[str, dict[str, Any]],
        *,
        directory: Path | None = None,
        health_interval: str = "1s",
        extra_config: str = "",
        store: str | None = None,
    ) -> Node:
        directory = directory or self.new_dir(label)
        config = directory / "concord.toml"
        config.write_text(render_config(servers, health_interval) + "\n" + extra_config)
        port = free_port()
        log_path = directory / "concord.log"
        stdout_path = directory / "concord.stdout"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        with open(log_path, "wb") as stderr, open(stdout_path, "wb") as stdout:
            proc = subprocess.Popen(
                [
                    str(CONCORD_BIN),
                    "up",
                    "--config",
                    str(config),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--data-dir",
                    str(directory / "data"),
                    *(["--store", store] if store else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=directory,
                env=env,
                start_new_session=True,
            )
        node = Node(label, directory, port, proc, log_path, stdout_path)
        self._nodes.append(node)
        _LIVE_LOGS[label] = log_path
        try:
            self._wait_ready(node)
        except BaseException:
            node.kill()
            raise
        return node

    @staticmethod
    def _wait_ready(node: Node) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise AssertionError(
                    f"concord node {node.label!r} exited with {node.proc.returncode} before it was ready\n"
                    f"config:\n{(node.directory / 'concord.toml').read_text()}\nlog:\n{node.log()}"
                )
            try:
                status, body = http_get(f"{node.base_url}/readyz", timeout=2)
                if status == 200:
                    return
                last = f"{status} {body[:500]}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(
            f"concord node {node.label!r} not ready after {READY_TIMEOUT}s (last /readyz: {last})\nlog:\n{node.log()}"
        )

    def stop_all(self) -> None:
        errors = []
        for node in self._nodes:
            try:
                node.stop()
            except AssertionError as e:
                errors.append(str(e))
        assert not errors, "\n\n".join(errors)


@pytest.fixture(scope="session")
def concord(tmp_path_factory: pytest.TempPathFactory, dependencies: None) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path_factory)
    yield factory
    factory.stop_all()


# --------------------------------------------------------------------------------------
# server-everything over HTTP (streamable HTTP and legacy SSE), started by the suite
# --------------------------------------------------------------------------------------


@dataclass
class PeerServer:
    label: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def stop(self) -> None:
        _LIVE_LOGS.pop(self.label, None)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _start_everything(tmp_path_factory: pytest.TempPathFactory, mode: str, port: int | None = None) -> PeerServer:
    directory = tmp_path_factory.mktemp(f"everything-{mode}")
    port = port or free_port()
    log_path = directory / "server.log"
    env = dict(os.environ, PORT=str(port))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [NODE_BIN, str(EVERYTHING_JS), mode],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
            start_new_session=True,
        )
    label = f"server-everything {mode} :{port}"
    server = PeerServer(label, proc, port, log_path)
    _LIVE_LOGS[label] = log_path

    def accepting() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{label} exited with {proc.returncode}:\n{_tail(log_path)}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_until(accepting, timeout=30, interval=0.1, what=f"{label} to listen on port {port}")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def everything_http(tmp_path_factory: pytest.TempPathFactory, dependencies: None) -> Iterator[PeerServer]:
    """server-everything in streamableHttp mode; its endpoint is http://127.0.0.1:PORT/mcp."""
    server = _start_everything(tmp_path_factory, "streamableHttp")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def everything_sse(tmp_path_factory: pytest.TempPathFactory, dependencies: None) -> Iterator[PeerServer]:
    """server-everything in legacy SSE mode; its endpoint is http://127.0.0.1:PORT/sse."""
    server = _start_everything(tmp_path_factory, "sse")
    yield server
    server.stop()

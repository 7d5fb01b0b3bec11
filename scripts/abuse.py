#!/usr/bin/env python3
"""Abuse run (issue 13, "One front door", Proof): a bounded attack on a real node, on loopback.

Starts `concord up` with auth on (API keys only) and two stdio upstreams from the testkit: `fx`
(the echo fixture) and `fl` (the same fixture with `--stderr-flood N --crash-after K`: it floods
its stderr with one 1 MiB line and N short ones every time it starts, and exits after K answers,
so the node restarts it and it floods again). Principals:

- alice: allowed everything (policy rule `principal.id == "alice"`); the legitimate client. In
  its own process it calls `fx__echo` one call at a time for the whole run and records every
  call's outcome and latency;
- mallory: allowed `registry/register` only;
- operator: allowed `tools/call` on server `fl` only; it keeps calling `fl__echo` during the
  attack, which crashes `fl` (after K answers) so that the node restarts it (with its crash-loop
  backoff: 0.25 s, 0.5 s, 1 s, …) and it floods its stderr again.

Phases: a baseline (alice alone), then `--rounds` (default 2) rounds of abuse (alice and
everything below, concurrently) each followed by an "after" phase (alice alone again, longer
than the 10 s audit noise window). A second round shows whether what grew in the first keeps
growing. Each round:

1. 10,000 unauthenticated requests over 16 keep-alive connections, cycling through every
   protected route pattern of the front door (/mcp, /api/v1/*, /metrics) and seven kinds of
   credentials: none, a Basic header, a garbage bearer token, random API keys, alice's key id
   with a wrong secret, a malformed API key, and API keys with a 4 KiB id (`--long-key-bytes`);
2. mallory: 1,000 registrations under distinct names (`kind = "llm"`, so the node probes no
   endpoint; ttl 1 h, so that none expires during the run); the node caps registrations per
   principal (`[node] registry_max_per_principal`, default 100) so all but the first 100 are
   refused 429 — in the second round all of them; plus 100 registrations whose metadata is
   over 16 KiB and 100 bodies over 64 KiB (413 both), 8 at a time;
3. the operator pokes `fl` every 200 ms: each restart floods the node's stderr pump again.

`--abuse-seconds S` spreads (1) and (2) evenly over S seconds instead of full speed.

Measured: the node's RSS (VmRSS, sampled every 50 ms; VmHWM) at start, before the attack, at
each round's peak and after each round; its open file descriptors and threads; its CPU; the size
of its log; audit rows (by source) and registry rows in the SQLite store (DATA_DIR/state.db,
tables `audit_log`, `registry`, `registry_names`); whether the audit trail's counted
authentication failures add up to the 401s the attack received; `concord audit verify`;
alice's successes, errors and p50/p99 latency in every phase (ratios against the baseline of
the same run).

Exits 1 if a legitimate call failed or if the audit trail grew by more than the bound derived
from the design (see `audit_bound`); prints a JSON summary and a markdown table.

Usage (release build, as ./scripts/bench.sh builds it; the repo's .venv):
    .venv/bin/python scripts/abuse.py [--profile release|debug] [--json-out FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The route patterns an unauthenticated request can hit, and the reasons the node gives; the
# auth-failure audit entry is keyed by (route pattern, reason, source address).
UNAUTH_ROUTES: list[tuple[str, str]] = [
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("DELETE", "/mcp"),
    ("GET", "/api/v1/state/notes/{rand}"),
    ("PUT", "/api/v1/state/notes/{rand}"),
    ("GET", "/api/v1/state/changes?prefix=notes/"),
    ("GET", "/api/v1/registry"),
    ("POST", "/api/v1/registry"),
    ("GET", "/api/v1/registry/resolve?capability=llm"),
    ("POST", "/api/v1/registry/{rand}/heartbeat"),
    ("DELETE", "/api/v1/registry/{rand}"),
    ("GET", "/api/v1/usage"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/admin/status"),
]
# Distinct route patterns among UNAUTH_ROUTES (GET/PUT state share `/api/v1/state/{*key}`;
# GET/POST/DELETE /mcp share `/mcp`; POST/GET registry share `/api/v1/registry`).
UNAUTH_PATTERNS = {
    "/mcp",
    "/api/v1/state/{*key}",
    "/api/v1/state/changes",
    "/api/v1/registry",
    "/api/v1/registry/resolve",
    "/api/v1/registry/{id}/heartbeat",
    "/api/v1/registry/{id}",
    "/api/v1/usage",
    "/metrics",
    "/api/v1/admin/status",
}
# Credential classes; "reason" is what the node is expected to answer (one audit key each).
CREDENTIALS = {
    "none": "authentication required",
    "basic": "expected `Authorization: Bearer …`",
    "garbage": "this node accepts API keys only (no JWT keys are configured)",
    "random_key": "unknown API key",
    "alice_wrong_secret": "unknown API key",
    "malformed_key": "malformed API key",
    "long_key": "unknown API key",
}

POLICY = """
[[rules]]
name = "alice-everything"
effect = "allow"
when = 'principal.id == "alice"'

[[rules]]
name = "mallory-registers"
effect = "allow"
when = 'principal.id == "mallory" && method == "registry/register"'

[[rules]]
name = "operator-pokes-the-flooder"
effect = "allow"
when = 'principal.id == "operator" && method == "tools/call" && server == "fl"'
"""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a live process."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, PermissionError):
        return -1


def http(method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class RssSampler(threading.Thread):
    """Samples the node's VmRSS every `interval` seconds: (monotonic time, kB)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            rss = proc_status(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stopping.wait(self.interval)

    def peak(self, start: float, end: float) -> int | None:
        inside = [kb for t, kb in self.samples if start <= t <= end]
        return max(inside) if inside else None


# ---------------------------------------------------------------------------------------------
# The store (read-only while the node runs; SQLite WAL allows it)
# ---------------------------------------------------------------------------------------------


class StoreReader:
    def __init__(self, db: Path) -> None:
        self.db = db

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def snapshot(self) -> dict[str, Any]:
        with self._connect() as conn:
            max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_log").fetchone()[0]
            rows = conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]
            registry = conn.execute("SELECT COUNT(*) FROM registry").fetchone()[0]
            mallory_rows = conn.execute("SELECT COUNT(*) FROM registry WHERE owner = 'mallory'").fetchone()[0]
            names = conn.execute("SELECT COUNT(*) FROM registry_names").fetchone()[0]
        size = sum(p.stat().st_size for p in self.db.parent.glob(self.db.name + "*") if p.is_file())
        return {
            "audit_rows": rows,
            "audit_max_seq": max_seq,
            "registry_rows": registry,
            "registry_rows_mallory": mallory_rows,
            "registry_names": names,
            "store_bytes": size,
        }

    def audit_since(self, seq: int) -> list[tuple[int, str, str, dict[str, Any]]]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT seq, kind, principal, data FROM audit_log WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
        out = []
        for s, kind, principal, data in rows:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = {}
            out.append((s, kind, principal, parsed))
        return out


# ---------------------------------------------------------------------------------------------
# Worker processes (each with its own event loop, so that the attackers' Python work does not
# sit in the legitimate client's measurements)
# ---------------------------------------------------------------------------------------------


def legit_worker(url: str, token: str, tool: str, out: str, stop: Any, started: Any) -> None:
    """Calls `tool` one call at a time until `stop` is set; writes [(t0, seconds, ok, error)]."""
    import anyio
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    calls: list[tuple[float, float, bool, str]] = []

    async def session() -> None:
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with http_client, Client(
            streamable_http_client(url, http_client=http_client), mode="legacy", cache=None
        ) as client:
            started.set()
            i = 0
            while not stop.is_set():
                i += 1
                message = f"legit {i}"
                t0 = time.monotonic()
                try:
                    with anyio.fail_after(30):
                        result = await client.call_tool(tool, {"message": message})
                    texts = "".join(getattr(b, "text", "") for b in result.content)
                    ok = (not result.is_error) and texts == f"Echo: {message}"
                    error = "" if ok else f"unexpected result: {texts[:200]}"
                except Exception as e:  # noqa: BLE001 - every failure is recorded
                    ok, error = False, f"{type(e).__name__}: {e}"[:300]
                calls.append((t0, time.monotonic() - t0, ok, error))
                if not ok and "ClosedResourceError" in error:
                    return  # the session is gone: reconnect

    async def main() -> None:
        while not stop.is_set():
            try:
                await session()
            except Exception as e:  # noqa: BLE001 - a lost session is a failed call, then reconnect
                calls.append((time.monotonic(), 0.0, False, f"session: {type(e).__name__}: {e}"[:300]))
                await anyio.sleep(0.1)

    try:
        anyio.run(main)
    finally:
        Path(out).write_text(json.dumps(calls))


def unauth_worker(
    base: str, count: int, concurrency: int, alice_key_id: str, credentials: list[str], long_key_bytes: int,
    out: str, seed: int, pace: float, ready: Any, go: Any,
) -> None:
    """`count` requests without valid credentials, round-robin over routes and credentials, over
    `concurrency` keep-alive connections. A minimal HTTP/1.1 client on asyncio streams: httpx
    tops out near 250 requests/s on this machine, which would make the client the bottleneck.
    `pace`: seconds over which to spread the requests evenly (0: as fast as they are answered)."""
    rng = random.Random(seed)
    host, port = base.removeprefix("http://").split(":")

    def credential(kind: str) -> str | None:
        if kind == "none":
            return None
        if kind == "basic":
            return "Basic " + base64.b64encode(b"admin:admin").decode()
        if kind == "garbage":
            head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": f"k{rng.randrange(10**6)}"}).encode())
            return "Bearer " + head.decode().rstrip("=") + "." + secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(32)
        if kind == "random_key":
            return f"Bearer ck_{secrets.token_hex(6)}_{secrets.token_hex(32)}"
        if kind == "alice_wrong_secret":
            return f"Bearer ck_{alice_key_id}_{secrets.token_hex(32)}"
        if kind == "malformed_key":
            return f"Bearer ck_{secrets.token_hex(20)}"
        if kind == "long_key":
            return f"Bearer ck_{secrets.token_hex(long_key_bytes // 2)}_{secrets.token_hex(32)}"
        raise ValueError(kind)

    def request_bytes(i: int) -> tuple[str, bytes]:
        method, path = UNAUTH_ROUTES[i % len(UNAUTH_ROUTES)]
        kind = credentials[(i // len(UNAUTH_ROUTES)) % len(credentials)]
        path = path.replace("{rand}", secrets.token_hex(8))
        headers = [
            f"{method} {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Accept: application/json, text/event-stream",
            "Content-Type: application/json",
        ]
        auth = credential(kind)
        if auth is not None:
            headers.append(f"Authorization: {auth}")
        if method == "DELETE" and path == "/mcp":
            headers.append(f"Mcp-Session-Id: {secrets.token_hex(16)}")
        body = b""
        if method in ("POST", "PUT"):
            body = json.dumps(
                {"jsonrpc": "2.0", "id": i, "method": "initialize",
                 "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                            "clientInfo": {"name": "stranger", "version": "1"}}}
            ).encode()
        headers.append(f"Content-Length: {len(body)}")
        return kind, ("\r\n".join(headers) + "\r\n\r\n").encode() + body

    async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
        """(status, keep-alive) of one response, its body read and dropped."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip().lower()
        if "content-length" in fields:
            await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.read()  # until the connection closes
            return status, False
        return status, fields.get("connection") != "close"

    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    by_credential: dict[str, list[float]] = {}
    connections = {"opened": 0}

    async def main() -> tuple[float, float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)

        async def worker() -> None:
            reader = writer = None
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if pace:
                    await asyncio.sleep(max(0.0, t_start + i * pace / count - time.monotonic()))
                kind, raw = request_bytes(i)
                t0 = time.monotonic()
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, int(port))
                        connections["opened"] += 1
                    writer.write(raw)
                    await writer.drain()
                    status, keep = await asyncio.wait_for(read_response(reader), 30)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if not keep:
                        writer.close()
                        reader = writer = None
                except Exception as e:  # noqa: BLE001 - counted
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                elapsed = time.monotonic() - t0
                latencies.append(elapsed)
                by_credential.setdefault(kind, []).append(elapsed)
            if writer is not None:
                writer.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return t_start, time.monotonic()

    ready.set()
    go.wait()
    t_start = time.monotonic()
    t_start, t_end = asyncio.run(main())
    latencies.sort()
    Path(out).write_text(json.dumps({
        "sent": count, "statuses": statuses, "errors": errors, "started": t_start, "ended": t_end,
        "connections": connections["opened"],
        "p50_ms": round(1000 * (percentile(latencies, 50) or 0), 3),
        "p99_ms": round(1000 * (percentile(latencies, 99) or 0), 3),
        "p50_ms_by_credential": {
            k: round(1000 * (percentile(sorted(v), 50) or 0), 3) for k, v in sorted(by_credential.items())
        },
    }))


def mallory_worker(
    base: str, token: str, prefix: str, registrations: int, oversized: int, concurrency: int, out: str, seed: int,
    pace: float, ready: Any, go: Any,
) -> None:
    """`registrations` distinct registrations, then `oversized` metadata > 16 KiB and `oversized`
    bodies > 64 KiB, shuffled together."""
    import httpx2 as httpx

    rng = random.Random(seed)
    jobs: list[tuple[str, int]] = [("register", i) for i in range(registrations)]
    jobs += [("big_metadata", i) for i in range(oversized)] + [("big_body", i) for i in range(oversized)]
    rng.shuffle(jobs)
    statuses: dict[str, dict[str, int]] = {}
    errors: dict[str, int] = {}

    def registration(name: str) -> dict[str, Any]:
        return {
            "name": name, "version": "1.0.0", "kind": "llm", "capabilities": ["llm"], "tags": ["abuse"],
            "endpoint": {"url": "https://llm.example.invalid/v1"}, "ttl_seconds": 3600,
        }

    async def one(client: Any, job: tuple[str, int]) -> None:
        what, i = job
        body = registration(f"{prefix}-{what.replace('_', '-')}-{i:05d}")
        if what == "big_metadata":
            body["metadata"] = {"blob": "x" * (20 * 1024)}  # over 16 KiB, under 64 KiB
        elif what == "big_body":
            body["metadata"] = {f"k{j}": "y" * 1024 for j in range(128)}  # ~130 KiB > 64 KiB
        try:
            response = await client.post(
                base + "/api/v1/registry", content=json.dumps(body),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            by = statuses.setdefault(what, {})
            by[str(response.status_code)] = by.get(str(response.status_code), 0) + 1
        except Exception as e:  # noqa: BLE001 - a reset after an early 413 is possible
            errors[f"{what}: {type(e).__name__}"] = errors.get(f"{what}: {type(e).__name__}", 0) + 1

    async def main() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            queue: asyncio.Queue[tuple[int, tuple[str, int]]] = asyncio.Queue()
            for n, job in enumerate(jobs):
                queue.put_nowait((n, job))
            await asyncio.to_thread(lambda: (ready.set(), go.wait()))
            t_start = time.monotonic()

            async def worker() -> None:
                while True:
                    try:
                        n, job = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    if pace:
                        await asyncio.sleep(max(0.0, t_start + n * pace / len(jobs) - time.monotonic()))
                    await one(client, job)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return t_start, time.monotonic()

    t_start, t_end = asyncio.run(main())
    Path(out).write_text(json.dumps({
        "sent": len(jobs), "statuses": statuses, "errors": errors, "started": t_start, "ended": t_end,
    }))


def flood_trigger_worker(url: str, token: str, out: str, stop: Any, ready: Any, go: Any) -> None:
    """Calls `fl__echo` (every call past the fixture's K-th answer crashes it: the node restarts
    it, and it floods its stderr again) until `stop` is set."""
    import anyio
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    counts = {"calls": 0, "ok": 0, "failed": 0}

    async def main() -> None:
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with http_client, Client(
            streamable_http_client(url, http_client=http_client), mode="legacy", cache=None
        ) as client:
            await anyio.to_thread.run_sync(lambda: (ready.set(), go.wait()))
            while not stop.is_set():
                counts["calls"] += 1
                try:
                    with anyio.fail_after(15):
                        result = await client.call_tool("fl__echo", {"message": "poke"})
                    counts["ok" if not result.is_error else "failed"] += 1
                except Exception:  # noqa: BLE001 - expected: the flooder crashes
                    counts["failed"] += 1
                await anyio.sleep(0.2)

    try:
        anyio.run(main)
    except Exception as e:  # noqa: BLE001
        counts["session_error"] = f"{type(e).__name__}: {e}"[:300]
    Path(out).write_text(json.dumps(counts))


# ---------------------------------------------------------------------------------------------
# The node
# ---------------------------------------------------------------------------------------------


class NodeRun:
    def __init__(self, directory: Path, profile: str, flood_lines: int, crash_after: int) -> None:
        self.directory = directory
        self.bin = REPO / "target" / profile / "concord"
        self.fixture = REPO / "target" / profile / "concord-fixture"
        for path in (self.bin, self.fixture):
            if not path.exists():
                sys.exit(f"{path} is missing: build with `cargo build {'--release ' if profile == 'release' else ''}--workspace --bins`")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = directory / "concord.toml"
        self.data = directory / "data"
        self.log_path = directory / "concord.log"
        (directory / "policy.toml").write_text(POLICY)
        self.config.write_text(
            "[node]\n"
            'health_interval = "60s"\n\n'
            "[servers.fx]\n"
            f"command = {json.dumps(str(self.fixture))}\n"
            'args = ["--name", "fx"]\n\n'
            "[servers.fl]\n"
            f"command = {json.dumps(str(self.fixture))}\n"
            f'args = ["--name", "fl", "--stderr-flood", "{flood_lines}", "--crash-after", "{crash_after}"]\n\n'
            "[auth]\n"
            "enabled = true\n\n"
            "[policy]\n"
            'file = "policy.toml"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin), *args, "--config", str(self.config), "--data-dir", str(self.data)],
            capture_output=True, text=True, timeout=120, cwd=self.directory,
        )

    def create_key(self, principal: str) -> str:
        self.data.mkdir(parents=True, exist_ok=True)
        done = self.cli("keys", "create", "--principal", principal, "--role", "user")
        if done.returncode != 0 or not done.stdout.strip().startswith("ck_"):
            sys.exit(f"concord keys create failed: {done.stderr}")
        return done.stdout.strip()

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.bin), "up", "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}",
                 "--data-dir", str(self.data)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the node exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if http("GET", f"{self.base}/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        sys.exit(f"the node was not ready after 90 s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_bytes(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-chars:]

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
            return -9


def server_status(node: NodeRun, token: str) -> dict[str, Any]:
    status, body = http("GET", f"{node.base}/api/v1/admin/status", token)
    if status != 200 or not isinstance(body, dict):
        return {}
    return {s.get("name"): s for s in body.get("servers", [])}


def wait_tools(node: NodeRun, token: str, names: set[str], timeout: float = 60) -> None:
    """Waits until both upstreams are healthy (admin status, as alice)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        servers = server_status(node, token)
        last = {k: v.get("state") or v.get("health") for k, v in servers.items()}
        if all(str((servers.get(n) or {}).get("state", (servers.get(n) or {}).get("health", ""))).startswith("healthy") for n in names):
            return
        time.sleep(0.2)
    sys.exit(f"upstreams {names} not healthy after {timeout} s (last: {last})\n{node.log_tail()}")


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def phase_stats(calls: list[list[Any]], start: float, end: float) -> dict[str, Any]:
    inside = [c for c in calls if start <= c[0] < end]
    ok = sorted(c[1] for c in inside if c[2])
    failed = [c for c in inside if not c[2]]
    seconds = max(end - start, 1e-9)
    return {
        "seconds": round(seconds, 2),
        "calls": len(inside),
        "ok": len(ok),
        "failed": len(failed),
        "calls_per_s": round(len(ok) / seconds, 1),
        "p50_ms": None if not ok else round(1000 * percentile(ok, 50), 3),
        "p99_ms": None if not ok else round(1000 * percentile(ok, 99), 3),
        "max_ms": None if not ok else round(1000 * ok[-1], 3),
        "errors": sorted({c[3] for c in failed})[:5],
    }


def audit_bound(
    unauth_seconds: list[float], distinct_keys: int, mallory_sent: int, alice_requests: int,
    operator_calls: int, rounds: int, whole_seconds: float,
) -> dict[str, int]:
    """The most audit rows the design allows for this run, by source.

    - Authentication failures are noise (`AuditLog::record_noise`, crates/concord-governance/
      src/audit.rs): the first of each distinct (kind, principal "-", {path: the route
      pattern, reason, source address}) in a 10 s window is written at once, the rest of that
      window as one entry with their `count` when it closes: at most 2 rows per distinct key per
      window. The attack uses |route patterns| x |reasons| keys from one address, and a burst
      lasting T seconds touches at most floor(T / 10) + 2 windows.
    - mallory is authenticated and accountable: each of its requests is one policy decision
      (`decide_route` records every decision); what the registry refuses (403/413/429) adds
      nothing. At most one row per request.
    - alice and the operator: a tool call is a policy decision plus its outcome (2 rows); an
      admin-status request one decision; plus a few rows per MCP session.
    - Anything else (`audit_gap` entries, policy reloads): at most one per window of the run.
    """
    windows = sum(int(t // 10) + 2 for t in unauth_seconds)
    return {
        "windows": windows,
        "distinct_unauth_keys": distinct_keys,
        "unauthenticated": 2 * distinct_keys * windows,
        "mallory": mallory_sent,
        "alice": alice_requests,
        "operator": 2 * operator_calls + 20 * rounds,
        "other": int(whole_seconds // 10) + 2,
    }


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


def mib(kb: int | None) -> str:
    return "–" if kb is None else f"{kb / 1024:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    legit = summary["legit"]
    rounds = summary["rounds"]
    lines = [
        f"Abuse run, {summary['when']}, {summary['cores']} cores (load average {summary['loadavg_start']} at start, "
        f"{summary['loadavg_end']} at end), {summary['profile']} build, "
        + (f"attack spread over {summary['abuse_pace_seconds']:g} s" if summary["abuse_pace_seconds"] else "attack at full speed")
        + f", {len(rounds)} round(s): `{summary['command']}`",
        "",
        "| legitimate client (alice, fx__echo, 1 in flight) | s | calls | ok | failed | calls/s | p50 ms | p99 ms | max ms | vs baseline: calls/s, p50, p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, s: dict[str, Any], ratios: dict[str, Any] | None) -> str:
        rel = "" if ratios is None else f"{fmt(ratios['throughput'])}× / {fmt(ratios['p50'])}× / {fmt(ratios['p99'])}×"
        return (
            f"| {label} | {s['seconds']:.1f} | {s['calls']} | {s['ok']} | {s['failed']} | {s['calls_per_s']} | "
            f"{fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['max_ms'])} | {rel} |"
        )

    lines.append(row("baseline (alone)", legit["baseline"], None))
    for n, r in enumerate(rounds, 1):
        lines.append(row(f"round {n}: during the abuse", r["legit_abuse"], r["ratios_abuse"]))
        lines.append(row(f"round {n}: after (alone)", r["legit_after"], r["ratios_after"]))
    m = summary["memory"]
    head = "| node | start | before abuse | " + " | ".join(
        f"round {n}: peak | round {n}: after" for n in range(1, len(rounds) + 1)
    ) + " | end − before |"
    lines += ["", head, "|" + "---|" * (3 + 2 * len(rounds) + 1)]
    rss = [mib(m["rss_start_kb"]), mib(m["rss_before_kb"])]
    fds = [str(m["fds_start"]), str(m["fds_before"])]
    thr = [str(m["threads_start"]), str(m["threads_before"])]
    logs = [f"{summary['log']['start_bytes'] / 1024:.0f}", f"{summary['log']['before_bytes'] / 1024:.0f}"]
    audit = ["–", str(summary["audit"]["before"]["audit_rows"])]
    reg = ["–", f"{summary['registry']['before']['registry_rows']} ({summary['registry']['before']['registry_rows_mallory']})"]
    names = ["–", str(summary["registry"]["before"]["registry_names"])]
    store = ["–", f"{summary['audit']['before']['store_bytes'] / 2**20:.1f}"]
    for r in rounds:
        a = r["after"]
        rss += [mib(r["rss_peak_kb"]), mib(a["VmRSS"])]
        fds += ["–", str(a["fds"])]
        thr += ["–", str(a["Threads"])]
        logs += ["–", f"{a['log'] / 1024:.0f}"]
        audit += ["–", str(a["store"]["audit_rows"])]
        reg += ["–", f"{a['store']['registry_rows']} ({a['store']['registry_rows_mallory']})"]
        names += ["–", str(a["store"]["registry_names"])]
        store += ["–", f"{a['store']['store_bytes'] / 2**20:.1f}"]
    last = rounds[-1]["after"]
    before_store = summary["audit"]["before"]
    lines += [
        f"| RSS MiB | {' | '.join(rss)} | {(last['VmRSS'] - m['rss_before_kb']) / 1024:+.1f} |",
        f"| open fds | {' | '.join(fds)} | {last['fds'] - m['fds_before']:+d} |",
        f"| threads | {' | '.join(thr)} | {last['Threads'] - m['threads_before']:+d} |",
        f"| log KiB | {' | '.join(logs)} | {(last['log'] - summary['log']['before_bytes']) / 1024:+.0f} |",
        f"| audit rows | {' | '.join(audit)} | {summary['audit']['growth']:+d} (bound {summary['audit']['bound_total']}) |",
        f"| registry rows (mallory's) | {' | '.join(reg)} | {last['store']['registry_rows'] - before_store['registry_rows']:+d} |",
        f"| registry names claimed | {' | '.join(names)} | {last['store']['registry_names'] - before_store['registry_names']:+d} |",
        f"| store files MiB | {' | '.join(store)} | {(last['store']['store_bytes'] - before_store['store_bytes']) / 2**20:+.1f} |",
        "",
        f"VmHWM (the kernel's peak RSS over the node's life): {mib(m['hwm_kb'])} MiB. Node CPU: "
        f"{summary['node_cpu']['baseline_cores']} cores busy in the baseline, "
        + ", ".join(f"{r['node_cpu_cores']} in round {n}" for n, r in enumerate(rounds, 1))
        + ".",
        "",
        "| audit rows written from the end of the baseline on, by source | rows | bound |",
        "|---|---|---|",
    ]
    au = summary["audit"]
    for who in ("unauthenticated", "mallory", "alice", "operator", "other"):
        lines.append(f"| {who} | {au['by_source'].get(who, 0)} | {au['bound'][who]} |")
    lines.append("")
    for n, r in enumerate(rounds, 1):
        un, ml = r["unauthenticated"], r["mallory"]
        lines.append(
            f"Round {n}: {un['sent']} unauthenticated requests in {un['seconds']:.1f} s ({un['per_s']:.0f}/s over "
            f"{un['connections']} connections, p50 {un['p50_ms']} ms, p99 {un['p99_ms']} ms), answers {un['statuses']}"
            + (f", client errors {un['errors']}" if un["errors"] else "")
            + f"; mallory: {ml['sent']} registration attempts in {ml['seconds']:.1f} s, answers {ml['statuses']}"
            + (f", client errors {ml['errors']}" if ml["errors"] else "")
            + f"; `fl` restarted (and flooded) {r['flood_restarts']} times, operator's pokes {r['trigger']}."
        )
    lines.append(
        f"The audit trail counts {au['auth_failures_counted']} authentication failures in {au['auth_failure_rows']} rows "
        f"({au['distinct_auth_failure_keys']} distinct route/reason keys) for the {summary['unauthenticated_401s']} 401s "
        f"answered; `concord audit verify`: exit {au['verify']['exit']}."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def snapshot(node: NodeRun, store: StoreReader | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {**proc_status(node.pid), "fds": open_fds(node.pid), "log": node.log_bytes(),
                           "cpu": cpu_seconds(node.pid), "t": time.monotonic()}
    if store is not None:
        out["store"] = store.snapshot()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="release", choices=["release", "debug"])
    parser.add_argument("--rounds", type=int, default=2, help="abuse + after phases, one after the other")
    parser.add_argument("--unauthenticated", type=int, default=10_000, help="per round")
    parser.add_argument("--credentials", default=",".join(CREDENTIALS), help="credential classes to cycle through")
    parser.add_argument("--long-key-bytes", type=int, default=4096, help="length of the id of a `long_key` API key")
    parser.add_argument("--registrations", type=int, default=1_000, help="per round, distinct names")
    parser.add_argument("--oversized", type=int, default=100, help="per round, of each kind (metadata, whole body)")
    parser.add_argument("--flood-lines", type=int, default=2_000_000, help="stderr lines per start of `fl`")
    parser.add_argument("--crash-after", type=int, default=6, help="answers before `fl` exits")
    parser.add_argument("--no-flood", action="store_true", help="do not poke `fl` during the abuse")
    parser.add_argument(
        "--abuse-seconds", type=float, default=0,
        help="spread the unauthenticated requests and the registrations evenly over this long (0: full speed)",
    )
    parser.add_argument("--baseline-seconds", type=float, default=10)
    parser.add_argument("--after-seconds", type=float, default=12, help="at least the 10 s noise window")
    parser.add_argument("--unauth-concurrency", type=int, default=16)
    parser.add_argument("--mallory-concurrency", type=int, default=8)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the node's directory")
    args = parser.parse_args()
    credentials = [c for c in args.credentials.split(",") if c]
    unknown = [c for c in credentials if c not in CREDENTIALS]
    if unknown or not credentials:
        parser.error(f"--credentials: unknown {unknown}; known: {', '.join(CREDENTIALS)}")
    distinct_keys = len(UNAUTH_PATTERNS) * len({CREDENTIALS[c] for c in credentials})

    ctx = mp.get_context("spawn")
    directory = Path(tempfile.mkdtemp(prefix="concord-abuse-"))
    node = NodeRun(directory, args.profile, args.flood_lines, args.crash_after)
    keys = {who: node.create_key(who) for who in ("alice", "mallory", "operator")}
    alice_key_id = keys["alice"].split("_")[1]
    loadavg_start = os.getloadavg()
    node.start()
    sampler = RssSampler(node.pid)
    sampler.start()
    store = StoreReader(node.data / "state.db")
    procs: list[Any] = []
    rounds: list[dict[str, Any]] = []
    admin_requests = 0
    got_401 = 0
    try:
        wait_tools(node, keys["alice"], {"fx", "fl"})
        admin_requests += 1
        time.sleep(3)
        start = snapshot(node)

        stop_legit, legit_started = ctx.Event(), ctx.Event()
        legit_out = directory / "legit.json"
        legit = ctx.Process(
            target=legit_worker,
            args=(f"{node.base}/mcp", keys["alice"], "fx__echo", str(legit_out), stop_legit, legit_started),
        )
        legit.start()
        procs.append(legit)
        if not legit_started.wait(60):
            raise SystemExit("the legitimate client did not connect within 60 s")
        baseline_start = snapshot(node)
        time.sleep(args.baseline_seconds)
        before = snapshot(node, store)

        for n in range(1, args.rounds + 1):
            fl_before = server_status(node, keys["alice"]).get("fl", {})
            admin_requests += 1
            # Three attacker processes, started and connected first, then let go at once.
            stop_trigger, go = ctx.Event(), ctx.Event()
            ready = [ctx.Event() for _ in range(3)]
            outs = {w: directory / f"round{n}-{w}.json" for w in ("unauth", "mallory", "trigger")}
            seed = int.from_bytes(os.urandom(4), "big")
            trigger = ctx.Process(
                target=flood_trigger_worker,
                args=(f"{node.base}/mcp", keys["operator"], str(outs["trigger"]), stop_trigger, ready[0], go),
            )
            unauth = ctx.Process(
                target=unauth_worker,
                args=(node.base, args.unauthenticated, args.unauth_concurrency, alice_key_id, credentials,
                      args.long_key_bytes, str(outs["unauth"]), seed, args.abuse_seconds, ready[1], go),
            )
            mallory = ctx.Process(
                target=mallory_worker,
                args=(node.base, keys["mallory"], f"m{n}", args.registrations, args.oversized,
                      args.mallory_concurrency, str(outs["mallory"]), seed, args.abuse_seconds, ready[2], go),
            )
            attackers = [unauth, mallory] + ([] if args.no_flood else [trigger])
            if args.no_flood:
                ready[0].set()
            for p in attackers:
                p.start()
                procs.append(p)
            for event in ready:
                if not event.wait(60):
                    raise SystemExit("an attacker process did not get ready within 60 s")
            abuse_start = snapshot(node)
            go.set()
            unauth.join()
            mallory.join()
            stop_trigger.set()
            if not args.no_flood:
                trigger.join(30)
            abuse_end = snapshot(node)
            fl_after = server_status(node, keys["alice"]).get("fl", {})
            admin_requests += 1
            # Alice alone again, for at least one noise window, so that counted rows are written.
            time.sleep(args.after_seconds)
            after = snapshot(node, store)
            unauth_result = json.loads(outs["unauth"].read_text())
            mallory_result = json.loads(outs["mallory"].read_text())
            trigger_result = json.loads(outs["trigger"].read_text()) if outs["trigger"].exists() else {}
            got_401 += unauth_result["statuses"].get("401", 0)
            for result in (unauth_result, mallory_result):
                result["seconds"] = result.pop("ended") - result.pop("started")
                result["per_s"] = result["sent"] / max(result["seconds"], 1e-9)
            rounds.append({
                "abuse_start": abuse_start, "abuse_end": abuse_end, "after": after,
                "rss_peak_kb": sampler.peak(abuse_start["t"], abuse_end["t"]),
                "node_cpu_cores": round((abuse_end["cpu"] - abuse_start["cpu"]) / max(abuse_end["t"] - abuse_start["t"], 1e-9), 2),
                "unauthenticated": unauth_result, "mallory": mallory_result, "trigger": trigger_result,
                "flood_restarts": (fl_after.get("restarts") or 0) - (fl_before.get("restarts") or 0),
            })
        stop_legit.set()
        legit.join(60)
        calls = json.loads(legit_out.read_text()) if legit_out.exists() else []

        # Wait (bounded) for the audit trail to account for every 401 the attack received.
        deadline = time.monotonic() + 30
        while True:
            rows = store.audit_since(before["store"]["audit_max_seq"])
            counted = sum(int(d.get("count", 0)) for _, k, _, d in rows if k == "auth_failure")
            if counted >= got_401 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1)
        end = snapshot(node, store)
        rows = [r for r in store.audit_since(before["store"]["audit_max_seq"]) if r[0] <= end["store"]["audit_max_seq"]]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        sampler.stopping.set()
        code = node.stop()
    loadavg_end = os.getloadavg()
    verify = node.cli("audit", "verify")

    # Audit rows by source.
    by_source: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    auth_rows = [r for r in rows if r[1] == "auth_failure"]
    for _, kind, principal, _ in rows:
        who = ("unauthenticated" if kind == "auth_failure" else
               principal if principal in ("alice", "mallory", "operator") else "other")
        by_source[who] = by_source.get(who, 0) + 1
        by_kind[f"{kind} ({principal})"] = by_kind.get(f"{kind} ({principal})", 0) + 1
    counted = sum(int(d.get("count", 0)) for _, _, _, d in auth_rows)
    distinct_seen = {(d.get("path"), d.get("reason"), d.get("source")) for _, _, _, d in auth_rows}
    gaps = [d for _, k, _, d in rows if k == "audit_gap"]

    # alice's calls whose rows can come after the snapshot (entries linger up to 20 ms).
    alice_calls = [c for c in calls if c[0] >= before["t"] - 1.0]
    bound = audit_bound(
        unauth_seconds=[r["unauthenticated"]["seconds"] for r in rounds],
        distinct_keys=distinct_keys,
        mallory_sent=sum(r["mallory"]["sent"] for r in rounds),
        alice_requests=2 * len(alice_calls) + admin_requests + 20,
        operator_calls=sum(int(r["trigger"].get("calls", 0)) for r in rounds),
        rounds=len(rounds),
        whole_seconds=end["t"] - before["t"],
    )
    bound_total = sum(v for k, v in bound.items() if k not in ("windows", "distinct_unauth_keys"))
    growth = end["store"]["audit_rows"] - before["store"]["audit_rows"]

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if not x or not y else round(x / y, 2)

    def ratios(s: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        return {"throughput": ratio(s["calls_per_s"], base["calls_per_s"]), "p50": ratio(s["p50_ms"], base["p50_ms"]),
                "p99": ratio(s["p99_ms"], base["p99_ms"])}

    baseline = phase_stats(calls, baseline_start["t"], before["t"])
    for r in rounds:
        r["legit_abuse"] = phase_stats(calls, r["abuse_start"]["t"], r["abuse_end"]["t"])
        r["legit_after"] = phase_stats(calls, r["abuse_end"]["t"], r["after"]["t"])
        r["ratios_abuse"] = ratios(r["legit_abuse"], baseline)
        r["ratios_after"] = ratios(r["legit_after"], baseline)
        r["seconds"] = round(r["abuse_end"]["t"] - r["abuse_start"]["t"], 2)
        for k in ("abuse_start", "abuse_end"):
            r.pop(k)
    all_failed = [c for c in calls if not c[2]]
    summary: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "loadavg_start": round(loadavg_start[0], 1),
        "loadavg_end": round(loadavg_end[0], 1),
        "profile": args.profile,
        "abuse_pace_seconds": args.abuse_seconds,
        "command": " ".join([".venv/bin/python", "scripts/abuse.py", *sys.argv[1:]]),
        "directory": str(directory),
        "legit": {"baseline": baseline},
        "rounds": rounds,
        "legit_calls_total": len(calls),
        "legit_failures_total": len(all_failed),
        "legit_failure_examples": sorted({c[3] for c in all_failed})[:5],
        "memory": {
            "rss_start_kb": start.get("VmRSS"), "rss_before_kb": before.get("VmRSS"), "rss_end_kb": end.get("VmRSS"),
            "hwm_kb": end.get("VmHWM"), "fds_start": start["fds"], "fds_before": before["fds"], "fds_end": end["fds"],
            "threads_start": start.get("Threads"), "threads_before": before.get("Threads"),
            "threads_end": end.get("Threads"), "rss_samples": len(sampler.samples),
        },
        "node_cpu": {
            "baseline_cores": round((before["cpu"] - baseline_start["cpu"]) / max(before["t"] - baseline_start["t"], 1e-9), 2),
        },
        "log": {"start_bytes": start["log"], "before_bytes": before["log"], "end_bytes": end["log"]},
        "audit": {
            "before": before["store"], "end": end["store"], "growth": growth,
            "bound": bound, "bound_total": bound_total, "by_source": by_source, "by_kind": by_kind,
            "auth_failure_rows": len(auth_rows), "auth_failures_counted": counted,
            "distinct_auth_failure_keys": len(distinct_seen), "audit_gaps": gaps[:5],
            "verify": {"exit": verify.returncode, "output": (verify.stdout + verify.stderr).strip()[-300:]},
        },
        "registry": {"before": before["store"], "end": end["store"]},
        "unauthenticated_401s": got_401,
        "node_exit": code,
    }

    # Checks: the two that fail the run; the rest are reported.
    failed_checks: list[str] = []
    if summary["legit_failures_total"]:
        failed_checks.append(
            f"{summary['legit_failures_total']} legitimate call(s) failed: {summary['legit_failure_examples']}"
        )
    for n, r in enumerate(rounds, 1):
        if not r["legit_abuse"]["ok"]:
            failed_checks.append(f"round {n}: no legitimate call completed during the abuse")
    if growth > bound_total:
        failed_checks.append(f"audit rows grew by {growth}, over the bound {bound_total}")
    warnings = []
    for who, rows_of in by_source.items():
        if rows_of > bound.get(who, 0):
            warnings.append(f"audit rows from {who}: {rows_of} > {bound.get(who, 0)}")
    if counted < got_401:
        warnings.append(f"the audit trail counts {counted} auth failures of {got_401} 401s (gaps: {gaps[:3]})")
    if verify.returncode != 0:
        warnings.append(f"concord audit verify failed: {summary['audit']['verify']['output']}")
    for n, r in enumerate(rounds, 1):
        unexpected = {k: v for k, v in r["unauthenticated"]["statuses"].items() if k != "401"}
        if unexpected or r["unauthenticated"]["errors"]:
            warnings.append(f"round {n}: unauthenticated requests not answered 401: {unexpected} {r['unauthenticated']['errors']}")
    if code not in (0, None):
        warnings.append(f"the node exited with {code} after SIGTERM")
    summary["failed_checks"] = failed_checks
    summary["warnings"] = warnings

    print(json.dumps(summary, indent=2))
    print()
    print(markdown(summary))
    for w in warnings:
        print(f"warning: {w}")
    for f in failed_checks:
        print(f"FAILED: {f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))
    if failed_checks or args.keep:
        print(f"node directory kept: {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())

"""The dev team's executor: an MCP server (official Python SDK, stdio) whose tools write and read
files and run commands, all inside one sandbox directory given on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer

SANDBOX = Path(sys.argv[1] if len(sys.argv) > 1 else "sandbox").resolve()
SANDBOX.mkdir(parents=True, exist_ok=True)
OUTPUT_LIMIT = 4000

server = MCPServer("executor", instructions=f"Files and commands inside the sandbox {SANDBOX}.")


def inside(path: str) -> Path:
    """A path in the sandbox; anything that would leave it is refused."""
    target = (SANDBOX / path).resolve()
    if target != SANDBOX and SANDBOX not in target.parents:
        raise ValueError(f"{path!r} is outside the sandbox")
    return target


@server.tool()
def write_file(path: str, content: str) -> str:
    """Write `content` to the file `path` (relative to the sandbox), creating directories."""
    target = inside(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    return f"wrote {len(content)} characters to {path}"


@server.tool()
def read_file(path: str) -> str:
    """Read the text file `path` (relative to the sandbox)."""
    return inside(path).read_text()[:OUTPUT_LIMIT]


@server.tool()
def run_command(command: str) -> str:
    """Run a shell command in the sandbox directory (30 s limit); returns its exit code and output."""
    try:
        done = subprocess.run(
            ["bash", "-c", command], cwd=SANDBOX, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "timed out after 30 s"
    output = (done.stdout + done.stderr)[-OUTPUT_LIMIT:]
    return f"exit code {done.returncode}\n{output}"


if __name__ == "__main__":
    server.run()

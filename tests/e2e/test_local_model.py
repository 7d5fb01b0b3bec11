"""One agent run against the real local model (Qwen2.5-Coder-1.5B-Instruct served by llama.cpp
through xllamacpp, set up offline by scripts/local-llm.sh): the agent must call the filesystem
reference server's read_text_file through the gateway to answer, and answers right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import FILESYSTEM_JS, NODE_BIN, REPO, NodeFactory, connect, free_port, stdio_server

pytestmark = pytest.mark.anyio

SECRET = "PLUM-4417"


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("local-llm") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "local-llm.sh"), "serve", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a first run downloads the model (about 1.2 GB)
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the local model server exited:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the local model did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"{base}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def test_an_agent_answers_by_reading_a_file_with_the_real_local_model(
    concord: NodeFactory, local_model: str, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "notes.txt").write_text(f"The access code is {SECRET}.\n")
    config = f"""
[providers.local]
api = "openai"
base_url = "{local_model}"
model = "local"
tags = ["local"]
timeout = "240s"
temperature = 0.0   # the most likely tokens: the same run every time

[agents.reader]
description = "Reads a file and answers"
instructions = "You can read files with the files__read_text_file tool. Always call it to read a file before answering. After the tool result, answer the user in one short sentence."
tools = ["files__read_text_file"]
max_iterations = 5
"""
    node = concord.start(
        "local-model",
        {"files": stdio_server(NODE_BIN, FILESYSTEM_JS, files)},
        extra_config=config,
    )
    try:
        async with connect(node.url, read_timeout_seconds=600) as client:
            started = time.monotonic()
            result = await client.call_tool(
                "agents__reader", {"task": f"What is the access code written in the file {files / 'notes.txt'}?"}
            )
            elapsed = time.monotonic() - started
        answer = result.structured_content
        print(f"local model run: {elapsed:.1f} s, {json.dumps(answer)}")
        assert not result.is_error, answer
        assert answer["tool_calls"] >= 1, answer
        assert SECRET in answer["answer"], answer
    finally:
        node.stop()

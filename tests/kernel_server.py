"""A real Jupyter Server in a subprocess, and a websocket client of its kernels.

Shared by the chart tests (the chart's server config) and the client matrix (our
kernelspecs). Nothing here imports the ``provisioners`` package: the server loads it
through its entry points, from the ``PYTHONPATH`` it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = "5.3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 120
) -> tuple[int, bytes]:
    """One HTTP request with the server's token; returns status and body (errors too)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class KernelServer:
    """A running ``jupyter server`` process."""

    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path
    token: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """``method`` on ``base + path`` (``path`` without a leading slash)."""
        return http(method, self.base + path, self.token, body)

    def channels_url(self, kernel_id: str) -> str:
        return self.base.replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"


@contextlib.contextmanager
def jupyter_server(
    env: Mapping[str, str],
    root_dir: Path,
    log_path: Path,
    *,
    base_url: str = "/",
    args: Sequence[str] = (),
    token: str = "",
    timeout: float = 60,
) -> Iterator[KernelServer]:
    """Start ``python -m jupyter_server`` on a loopback port with exactly ``env``; wait
    until it answers, and terminate it on exit (unless the caller stopped it)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root_dir}",
        *args,
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    root_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    server = KernelServer(proc, f"http://127.0.0.1:{port}{base_url}", log_path, token, dict(env))
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "server exited:\n" + server.log()
            try:
                if http("GET", server.base + "api", timeout=10)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer:\n" + server.log()
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def message(session: str, msg_type: str, content: dict[str, Any], channel: str = "shell") -> dict:
    """A Jupyter protocol message as the server's websocket takes it (JSON)."""
    msg_id = uuid.uuid4().hex
    return {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "header": {
            "msg_id": msg_id,
            "username": "test",
            "session": session,
            "date": datetime.now(timezone.utc).isoformat(),
            "msg_type": msg_type,
            "version": PROTOCOL_VERSION,
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


def execute_request(session: str, code: str) -> dict[str, Any]:
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
    }
    return message(session, "execute_request", content)


@dataclass
class Output:
    """What one request produced: its reply and the iopub output of that request."""

    stdout: str = ""
    stderr: str = ""
    #: ``data`` of each display_data / execute_result, in order.
    display: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reply: dict[str, Any] | None = None

    def add(self, msg: Mapping[str, Any]) -> None:
        """Take one iopub message (a client's dict, or the websocket's JSON)."""
        msg_type, content = msg["msg_type"], msg["content"]
        if msg_type == "stream":
            if content["name"] == "stdout":
                self.stdout += content["text"]
            else:
                self.stderr += content["text"]
        elif msg_type in ("display_data", "execute_result"):
            self.display.append(content["data"])
        elif msg_type == "error":
            self.errors.append(f"{content['ename']}: {content['evalue']}")

    @property
    def status(self) -> str:
        return (self.reply or {}).get("status", "")

    @property
    def ename(self) -> str:
        return (self.reply or {}).get("ename", "")


async def ws_request(
    ws: Any, msg: dict[str, Any], timeout: float = 60, *, on_sent: Any = None
) -> Output:
    """Send ``msg`` over a kernel's websocket; read until its reply and its iopub idle
    status (every output of a request precedes that status). ``on_sent`` (a coroutine
    function) runs once the kernel reports busy for it (e.g. to interrupt it)."""
    await ws.send(json.dumps(msg))
    out = Output()
    idle = False
    deadline = time.monotonic() + timeout
    while out.reply is None or not idle:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no reply / idle status for {msg['msg_type']}: {out}"
        reply = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        if reply.get("parent_header", {}).get("msg_id") != msg["msg_id"]:
            continue
        if reply["channel"] == "shell" and reply["msg_type"].endswith("_reply"):
            out.reply = reply["content"]
        elif reply["channel"] == "iopub" and reply["msg_type"] == "status":
            state = reply["content"]["execution_state"]
            idle = state == "idle"
            if state == "busy" and on_sent is not None:
                await on_sent()
                on_sent = None
        elif reply["channel"] == "iopub":
            out.add(reply)
    return out

"""A real Jupyter Server subprocess for tests: REST requests and a notebook's websocket.

Nothing here imports ``provisioners`` (the chart tests use the protocol helpers too).

``JupyterServer(tmp_path)`` serves the kernelspecs under ``tmp_path/data/kernels``
(write them with :func:`tests.helpers.write_kernelspec`) with this checkout's
``provisioners`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_VERSION = "5.3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class JupyterServer:
    """``python -m jupyter_server`` on a free port with a token; a context manager."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        *,
        args: list[str] | None = None,
        port: int | None = None,
        token: str | None = None,
    ) -> None:
        self.root = root
        self.kernels = root / "data" / "kernels"
        self.kernels.mkdir(parents=True, exist_ok=True)
        self.token = token or uuid.uuid4().hex
        self.port = port or free_port()
        self.args = list(args or [])
        self.base = f"http://127.0.0.1:{self.port}/"
        self.log_path = root / "server.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> JupyterServer:
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env.update(
            JUPYTER_PATH=str(self.root / "data"),
            JUPYTER_TOKEN=self.token,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        env.update(self.extra_env)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jupyter_server",
                    "--no-browser",
                    f"--port={self.port}",
                    "--ip=127.0.0.1",
                    "--allow-root",
                    f"--ServerApp.root_dir={self.root}",
                    *self.args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while self.request("GET", "api/status")[0] != 200:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "jupyter server did not start"
            time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, JSON body or text)``; status 0 when the server does not answer."""
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                data = response.read()
                return response.status, json.loads(data) if data else None
        except urllib.error.HTTPError as exc:
            text = exc.read().decode()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            return 0, str(exc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the server (unless it already exited); its exit code, None if killed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def wait_exit(self, timeout: float) -> int | None:
        """The server's exit code once it exits on its own within ``timeout``, else None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def ws_url(self, kernel_id: str, session: str) -> str:
        base = self.base.replace("http://", "ws://", 1)
        return f"{base}api/kernels/{kernel_id}/channels?session_id={session}"

    def ws_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def persist_server(
    root: Path,
    *,
    sessions: bool = True,
    adopt_interval: float | None = None,
    port: int | None = None,
    token: str | None = None,
) -> JupyterServer:
    """A Jupyter Server with the ``provisioners.persist`` extension on the state under
    ``root``: with ``sessions``, its sessions database on disk there (what survives a
    restart); ``adopt_interval``: the extension's, when not its default."""
    config = root / "config"
    config.mkdir(parents=True, exist_ok=True)
    extensions = {"provisioners.persist": True}
    settings: dict[str, Any] = {"ServerApp": {"jpserver_extensions": extensions}}
    if sessions:
        settings["SessionManager"] = {"database_filepath": str(root / "sessions.db")}
    if adopt_interval is not None:
        settings["PersistExtension"] = {"adopt_interval": adopt_interval}
    (config / "jupyter_server_config.json").write_text(json.dumps(settings))
    env = {"JUPYTER_CONFIG_DIR": str(config)}
    return JupyterServer(root, env=env, port=port, token=token)


async def run_code(
    server: JupyterServer, kernel_id: str, code: str, timeout: float = 60
) -> dict[str, str]:
    """Run ``code`` on ``kernel_id`` over a websocket of its own; see :func:`ws_execute`."""
    from websockets.asyncio.client import connect

    session = uuid.uuid4().hex
    headers = server.ws_headers()
    async with connect(server.ws_url(kernel_id, session), additional_headers=headers) as ws:
        return await ws_execute(ws, session, code, timeout)


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
    seen: list[str] = []  # what came instead, for the failure message
    while out.reply is None or not idle:
        remaining = deadline - time.monotonic()
        try:
            reply = json.loads(await asyncio.wait_for(ws.recv(), max(remaining, 0)))
        except TimeoutError:
            missing = " and no ".join(
                name for name, done in (("reply", out.reply), ("idle status", idle)) if not done
            )
            what = f"no {missing} for {msg['msg_type']} in {timeout:g} s"
            raise AssertionError(f"{what}; other messages: {seen[-20:]}; {out}") from None
        if reply.get("parent_header", {}).get("msg_id") != msg["msg_id"]:
            state = reply.get("content", {}).get("execution_state", "")
            seen.append(f"{reply.get('channel')}:{reply.get('msg_type')}:{state}".rstrip(":"))
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


async def ws_execute(ws: Any, session: str, code: str, timeout: float = 60) -> dict[str, str]:
    """Run ``code`` through a notebook's websocket; stdout, stderr and the reply status."""
    out = await ws_request(ws, execute_request(session, code), timeout)
    return {"stdout": out.stdout, "stderr": out.stderr, "status": out.status}


async def wait_for_status(ws: Any, state: str, timeout: float) -> None:
    """Read a kernel's websocket until its iopub status is ``state``; fail after
    ``timeout`` s saying what came instead."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0)))
        except TimeoutError:
            raise AssertionError(
                f"no {state!r} status in {timeout:g} s; saw {seen[-20:]}"
            ) from None
        current = msg.get("content", {}).get("execution_state", "")
        if msg.get("msg_type") == "status" and current == state:
            return
        seen.append(f"{msg.get('channel')}:{msg.get('msg_type')}:{current}".rstrip(":"))


async def until_answering(ws: Any, session: str, timeout: float) -> Output:
    """Ask the kernel for its info on an open websocket until it answers with its reply
    and its idle status, as a client must after an automatic restart (requests sent while
    the kernel was down may be answered later, or not)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return await ws_request(
                ws, message(session, "kernel_info_request", {}), timeout=min(5.0, max(left, 0))
            )
        except AssertionError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no kernel_info reply on the open websocket {timeout:g} s after "
                    f"the restart began: {exc}"
                ) from None


async def delete_kernel(
    server: JupyterServer, kernel_id: str, *, restart_may_be_pending: bool = False
) -> tuple[int, Any]:
    """``DELETE`` the kernel; its status and reply. After an automatic restart
    (``restart_may_be_pending``), the kernel answers through its kept address a moment
    before the restart returns (SSH: its launch still checks the new process);
    jupyter_client fails a shutdown meanwhile (``InvalidStateError``, HTTP 500: an
    upstream race no client can see coming), so that answer is retried for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        status, reply = await asyncio.to_thread(
            server.request, "DELETE", f"api/kernels/{kernel_id}"
        )
        pending = status == 500 and "InvalidStateError" in server.log()
        if not (restart_may_be_pending and pending and time.monotonic() < deadline):
            return status, reply
        await asyncio.sleep(0.5)

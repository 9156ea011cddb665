"""A real Jupyter Server subprocess for tests: REST requests and a notebook's websocket.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class JupyterServer:
    """``python -m jupyter_server`` on a free port with a token; a context manager."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.kernels = root / "data" / "kernels"
        self.kernels.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        self.port = free_port()
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


async def ws_execute(ws: Any, session: str, code: str, timeout: float = 60) -> dict[str, str]:
    """Run ``code`` through a notebook's websocket; stdout, stderr and the reply status."""
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "test",
        "session": session,
        "date": datetime.now(timezone.utc).isoformat(),
        "version": "5.3",
    }
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
    }
    message = {
        "header": header,
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }
    await ws.send(json.dumps(message))
    out = {"stdout": "", "stderr": "", "status": ""}
    idle = False
    deadline = time.monotonic() + timeout
    while not (out["status"] and idle):
        left = deadline - time.monotonic()
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(left, 0.01)))
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_reply":
            out["status"] = msg["content"]["status"]
        elif msg["msg_type"] == "stream":
            out[msg["content"]["name"]] += msg["content"]["text"]
        elif msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
    return out

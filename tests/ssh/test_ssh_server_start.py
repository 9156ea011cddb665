"""A failing SSH start requested through a real Jupyter Server leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import ClusterPortCache
from tests.engines.sshd import _children
from tests.helpers import SSH_PROVISIONER, wait_for, write_kernelspec

pytestmark = pytest.mark.ssh
TOKEN = "reattach-test-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"token {TOKEN}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def test_a_kernel_dying_at_start_through_jupyter_server_leaves_nothing(
    ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path, sshd: Any
) -> None:
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "no_such_kernel_module", "-f", "{connection_file}"]
    write_kernelspec(data / "kernels", "dies", SSH_PROVISIONER, ssh_config, argv=argv)
    port = _free_port()
    env = dict(os.environ, JUPYTER_PATH=str(data), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--ServerApp.port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.open_browser=False",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        up = wait_for(
            lambda: server.poll() is not None or _request_ok(f"{base}/api/status"), timeout=60
        )
        assert up and server.poll() is None, _tail(tmp_path)
        started = time.monotonic()
        status, body = _request(
            f"{base}/api/sessions",
            "POST",
            {"path": "x.ipynb", "type": "notebook", "name": "x", "kernel": {"name": "dies"}},
        )
        assert time.monotonic() - started < 20
        assert status >= 400, body
        assert "No module named" in json.dumps(body), body
        # nothing left: no remote kernel directory, no port record, no SSH session
        assert list(remote_runtime.iterdir()) == []
        assert ClusterPortCache.instance().held() in ({}, {"localhost": {}})
        assert wait_for(lambda: not _children(sshd.proc.pid), timeout=10)
        assert _request(f"{base}/api/kernels")[1] == []
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    assert list(remote_runtime.iterdir()) == []


def _request_ok(url: str) -> bool:
    try:
        return _request(url)[0] == 200
    except OSError:
        return False


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "server.log").read_text(errors="replace")[-3000:]

"""The local fallback never hands a kernel more than its target would have.

A kernel whose engine is unreachable runs locally with the environment policy of the
target it replaces, is refused inside a Kubernetes pod unless the kernelspec allows it,
shows in ``jupyter-provisioners list``, and tells the person at the notebook in the
output of the first execution (checked through a real Jupyter Server).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from provisioners import LocalClusterProvisioner
from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import EngineUnavailableError
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, count, execute, write_kernelspec

NO_DAEMON = "unix:///nonexistent/cluster-provisioners/docker.sock"
SERVER_SECRETS = {
    "JUPYTER_TOKEN": "server-token-do-not-leak",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-do-not-leak",
    "KERNEL_SERVER_SECRET": "server-kernel-var-do-not-leak",
}
#: Unreachable engines, per target: the kernelspec config that makes each fall back.
UNREACHABLE = {
    "docker": (
        "cluster-docker-provisioner",
        {"image": KERNEL_TEST_IMAGE, "docker_host": NO_DAEMON},
    ),
    "ssh": (
        "cluster-ssh-provisioner",
        {"host": "127.0.0.1", "port": 1, "user": "nobody", "ssh_connect_timeout": 3},
    ),
}
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", sorted(UNREACHABLE))
async def test_fallback_kernel_gets_its_targets_env_policy(
    kernel_manager, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    provisioner, config = UNREACHABLE[target]
    km = kernel_manager(provisioner, config, argv=CONTAINER_ARGV, env={"FROM_SPEC": "spec"})
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    try:
        assert isinstance(km.provisioner.runner, LocalClusterProvisioner)
        out = await execute(km, "import os, json; print(json.dumps(dict(os.environ)))")
        kernel_env = json.loads(out["stdout"])
        for name in SERVER_SECRETS:
            assert name not in kernel_env, f"{name} reached the {target} fallback kernel"
            count("fallback env leaks checked", target)
        assert kernel_env["KERNEL_USERNAME"] == "alice"
        assert kernel_env["FROM_SPEC"] == "spec"
        # jupyter-provisioners list shows the kernel as a local fallback for its target.
        listed = subprocess.run(
            [sys.executable, "-m", "provisioners", "list", "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        rows = [r for r in json.loads(listed.stdout) if r["kernel_id"] == km.kernel_id]
        assert rows and rows[0]["target"] == "local", rows
        assert rows[0]["fallback_for"] == target, rows
    finally:
        await km.shutdown_kernel()


async def test_fallback_inside_a_pod_is_refused_unless_asked_for(
    kernel_manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    provisioner, config = UNREACHABLE["docker"]
    km = kernel_manager(provisioner, config, argv=CONTAINER_ARGV)
    with pytest.raises(EngineUnavailableError, match="fallback_in_pod") as info:
        await km.start_kernel()
    assert "nonexistent" in str(info.value)  # the cause is named
    assert not km.has_kernel
    assert ClusterPortCache.instance().held() == {}
    count("fallback refusals in a pod", "docker")

    allowed = kernel_manager(provisioner, {**config, "fallback_in_pod": True}, argv=CONTAINER_ARGV)
    await allowed.start_kernel()
    try:
        assert isinstance(allowed.provisioner.runner, LocalClusterProvisioner)
        assert (await execute(allowed, "print('asked for')"))["stdout"] == "asked for\n"
    finally:
        await allowed.shutdown_kernel()


# ----------------------------------------------------------------- through Jupyter Server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet
        return 0, str(exc)


@pytest.fixture
def jupyter_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real ``jupyter server`` serving an unreachable-Docker kernelspec: (base URL, token).

    Its environment holds server secrets, among them a ``KERNEL_*`` one.
    """
    token = uuid.uuid4().hex
    provisioner, config = UNREACHABLE["docker"]
    write_kernelspec(
        tmp_path / "data" / "kernels", "docker-down", provisioner, config, argv=CONTAINER_ARGV
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(SERVER_SECRETS)
    env.update(
        JUPYTER_PATH=str(tmp_path / "data"),
        JUPYTER_TOKEN=token,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while _request("GET", base + "api/status", token)[0] != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "jupyter server did not start"
            time.sleep(0.3)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _execute(ws: Any, session: str, code: str) -> dict[str, str]:
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
    await ws.send(
        json.dumps(
            {
                "header": header,
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    out = {"stdout": "", "stderr": ""}
    replied = idle = False
    while not (replied and idle):
        msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_reply":
            replied = True
        elif msg["msg_type"] == "stream":
            out[msg["content"]["name"]] += msg["content"]["text"]
        elif msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
    return out


async def test_the_notebook_is_told_its_kernel_fell_back(
    jupyter_server: tuple[str, str],
) -> None:
    base, token = jupyter_server
    # JupyterLab's path: the sessions API (jupyter_server passes its whole environment).
    status, session_model = _request(
        "POST",
        base + "api/sessions",
        token,
        {"path": "notebook.ipynb", "type": "notebook", "kernel": {"name": "docker-down"}},
    )
    assert status == 201, session_model
    kernel_id = session_model["kernel"]["id"]
    ws_url = base.replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"
    session = uuid.uuid4().hex
    try:
        async with connect(
            f"{ws_url}?session_id={session}",
            additional_headers={"Authorization": f"token {token}"},
            max_size=None,
            open_timeout=30,
        ) as ws:
            first = await _execute(ws, session, "print(6 * 7)")
            second = await _execute(
                ws, session, "import os, json; print(json.dumps(dict(os.environ)))"
            )
    finally:
        _request("DELETE", base + f"api/sessions/{session_model['id']}", token)
    assert first["stdout"] == "42\n"
    assert "NOT running on docker" in first["stderr"], first
    assert "nonexistent" in first["stderr"], first  # the cause
    assert second["stderr"] == "", "the notice is shown once, on the first execution"
    kernel_env = json.loads(second["stdout"])
    for name in SERVER_SECRETS:
        assert name not in kernel_env, f"{name} reached the kernel through Jupyter Server"
    assert kernel_env["JPY_SESSION_NAME"].endswith("notebook.ipynb")
    count("fallback notices seen in a notebook", "docker")

"""The local fallback never hands a kernel more than its target would have.

A kernel whose engine is unreachable runs locally with the environment policy of the
target it replaces, is refused inside a Kubernetes pod unless the kernelspec allows it,
shows in ``jupyter-provisioners list``, and tells the person at the notebook in the
output of the first execution (checked through a real Jupyter Server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import EngineUnavailableError
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, count, execute, write_kernelspec
from tests.jupyter_server import JupyterServer, ws_execute

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
        assert km.provisioner.engine.fallback_for
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
        assert allowed.provisioner.engine.fallback_for
        assert (await execute(allowed, "print('asked for')"))["stdout"] == "asked for\n"
    finally:
        await allowed.shutdown_kernel()


# ----------------------------------------------------------------- through Jupyter Server


@pytest.fixture
def jupyter_server(tmp_path: Path) -> Iterator[JupyterServer]:
    """A real ``jupyter server`` serving an unreachable-Docker kernelspec.

    Its environment holds server secrets (its token among them), a ``KERNEL_*`` one too.
    """
    secrets = {k: v for k, v in SERVER_SECRETS.items() if k != "JUPYTER_TOKEN"}
    server = JupyterServer(tmp_path, env=secrets)
    provisioner, config = UNREACHABLE["docker"]
    write_kernelspec(server.kernels, "docker-down", provisioner, config, argv=CONTAINER_ARGV)
    with server:
        yield server


async def test_the_notebook_is_told_its_kernel_fell_back(jupyter_server: JupyterServer) -> None:
    server = jupyter_server
    # JupyterLab's path: the sessions API (jupyter_server passes its whole environment).
    status, session_model = server.request(
        "POST",
        "api/sessions",
        {"path": "notebook.ipynb", "type": "notebook", "kernel": {"name": "docker-down"}},
    )
    assert status == 201, session_model
    session = uuid.uuid4().hex
    try:
        async with connect(
            server.ws_url(session_model["kernel"]["id"], session),
            additional_headers=server.ws_headers(),
            max_size=None,
            open_timeout=30,
        ) as ws:
            first = await ws_execute(ws, session, "print(6 * 7)")
            second = await ws_execute(
                ws, session, "import os, json; print(json.dumps(dict(os.environ)))"
            )
    finally:
        server.request("DELETE", f"api/sessions/{session_model['id']}")
    assert first["stdout"] == "42\n"
    assert "NOT running on docker" in first["stderr"], first
    assert "nonexistent" in first["stderr"], first  # the cause
    assert second["stderr"] == "", "the notice is shown once, on the first execution"
    kernel_env = json.loads(second["stdout"])
    for name in SERVER_SECRETS:
        assert name not in kernel_env, f"{name} reached the kernel through Jupyter Server"
    assert kernel_env["JPY_SESSION_NAME"].endswith("notebook.ipynb")
    count("fallback notices seen in a notebook", "docker")

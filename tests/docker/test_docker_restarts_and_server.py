"""Docker kernels through restarts with new ports and through a real Jupyter Server.

Issue 11: a restart with ``newports=True`` comes back on free ports and the manager's
ports never read 0 (JupyterLab's early-death auto-restart); a failed start reaches
``POST /api/kernels`` and ``POST /api/sessions`` in the engine's own words, and the
server still shuts down cleanly afterwards.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect

from provisioners.connection.files import PORT_NAMES
from provisioners.docker import LABEL_KERNEL_ID
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    execute,
    restart_watching_ports,
    take_ports_after_cleanup,
    write_kernelspec,
)
from tests.jupyter_server import JupyterServer, wait_for_status, ws_execute

pytestmark = pytest.mark.docker

DOCKER = "cluster-docker-provisioner"
MISSING_IMAGE = "cluster-provisioners/no-such-image:never-built"
#: Dies once, four seconds after it started (an IPython startup file): early enough for
#: jupyter_client's restarter to ask for new ports, late enough for a notebook to connect.
DIE_ONCE = """\
import os, threading
if not os.path.exists("/flag/died-once"):
    open("/flag/died-once", "w").close()
    threading.Timer(4, os._exit, [1]).start()
"""


async def test_newports_restart_on_free_ports_never_shows_port_0(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make({"port_range": "27000-27999"})
    await km.start_kernel()
    before = [km.get_connection_info()[name] for name in PORT_NAMES]
    first = km.provisioner.engine.container_id
    held = take_ports_after_cleanup(km)  # docker-proxy would fail: address already in use
    try:
        seen = await restart_watching_ports(km, now=True, newports=True)
        assert held
        after = [km.get_connection_info()[name] for name in PORT_NAMES]
        assert not set(after) & set(before)
        assert 0 not in seen, "the manager showed port 0 during the restart"
        assert seen <= set(before) | set(after)
        assert km.provisioner.engine.container_id != first
        out = await execute(km, "print('on new ports')", timeout=60)
        assert out["stdout"] == "on new ports\n"
        labels = tracker.containers(km.kernel_id)[0]["Labels"]
        assert all(str(port) in json.dumps(labels) for port in after)
    finally:
        for sock in held:
            sock.close()
    await km.shutdown_kernel()


def _spec(server: JupyterServer, name: str, config: dict[str, Any], **spec: Any) -> None:
    settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, **config}
    write_kernelspec(server.kernels, name, DOCKER, settings, argv=CONTAINER_ARGV, **spec)


@pytest.fixture
def server(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[JupyterServer]:
    """A Jupyter Server (the Docker daemon checked first: under CI a missing one fails)."""
    with JupyterServer(tmp_path) as running:
        yield running


def _kernel_containers(client: docker.DockerClient, kernel_id: str) -> list[Any]:
    flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
    return list(client.api.containers(all=True, filters=flt))


async def test_failed_starts_are_explained_and_the_server_still_shuts_down(
    server: JupyterServer, docker_client: docker.DockerClient
) -> None:
    _spec(server, "missing-image", {"image": MISSING_IMAGE})
    _spec(
        server,
        "exits-at-once",
        {"command": ["python3", "-c", "import sys; print('kernel boom'); sys.exit(3)"]},
    )
    _spec(server, "good", {})
    cases = {"missing-image": [MISSING_IMAGE], "exits-at-once": ["kernel boom", "code 3"]}
    for name, words in cases.items():
        status, reply = server.request("POST", "api/kernels", {"name": name})
        assert status == 500, reply
        assert isinstance(reply, dict) and reply["message"] != "Unhandled error", reply
        assert all(word in reply["message"] for word in words), reply
        status, reply = server.request(
            "POST",
            "api/sessions",
            {"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": name}},
        )
        assert status == 500, reply
        assert all(word in reply["message"] for word in words), reply
    status, kernel = server.request("POST", "api/kernels", {"name": "good"})
    assert status == 201, kernel
    assert _kernel_containers(docker_client, kernel["id"])
    status, reply = server.request("POST", "api/shutdown")
    assert status in (200, 0), reply
    assert server.wait_exit(60) is not None, server.log()
    assert "Kernel does not exist" not in server.log()
    assert _kernel_containers(docker_client, kernel["id"]) == []


async def test_early_death_auto_restart_keeps_the_notebook_working(
    server: JupyterServer, tmp_path: Path
) -> None:
    """JupyterLab's case: the kernel dies in its first seconds, jupyter_client's
    restarter restarts it with new ports, and the notebook reconnects at once."""
    flag = tmp_path / "flag"
    startup = flag / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-die-once.py").write_text(DIE_ONCE)
    for path in (flag, *flag.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)
    _spec(
        server,
        "dies-once",
        {"volumes": [f"{flag}:/flag"], "port_range": "27000-27999"},
        env={"IPYTHONDIR": "/flag/ipython"},
    )
    status, model = server.request(
        "POST",
        "api/sessions",
        {"path": "early.ipynb", "type": "notebook", "kernel": {"name": "dies-once"}},
    )
    assert status == 201, model
    kernel_id = model["kernel"]["id"]
    session = uuid.uuid4().hex
    headers = server.ws_headers()
    async with connect(server.ws_url(kernel_id, session), additional_headers=headers) as ws:
        await wait_for_status(ws, "restarting", timeout=30)
    assert (flag / "died-once").exists()
    # JupyterLab reconnects its websocket as soon as it reads "restarting"
    async with connect(
        server.ws_url(kernel_id, session), additional_headers=headers, open_timeout=90
    ) as ws:
        out = await ws_execute(ws, session, "print('alive after the restart')", timeout=60)
    assert out["stdout"] == "alive after the restart\n", out
    assert "restarting kernel (1/5), new random ports" in server.log()
    status, _ = server.request("DELETE", f"api/sessions/{model['id']}")
    assert status == 204


async def test_restart_and_run_at_once_keeps_every_output(server: JupyterServer) -> None:
    """A REST restart, then a request sent the moment it returns, on a websocket kept
    open through it (JupyterLab opens a new one after its own restarts; other clients,
    and every client through an automatic restart, keep theirs). The websocket's iopub
    socket reconnects through docker-proxy by itself; it lost the output (and the idle
    status) of that first request when the restart was reported before its reconnect
    reached the kernel. Other Docker kernels in the same server made that likely."""
    _spec(server, "rerun", {})
    kernels = [server.request("POST", "api/kernels", {"name": "rerun"})[1] for _ in range(3)]
    assert all("id" in k for k in kernels), kernels
    kernel_id, session = kernels[-1]["id"], uuid.uuid4().hex
    async with connect(
        server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
    ) as ws:
        assert (await ws_execute(ws, session, "print('before')"))["stdout"] == "before\n"
        for round_ in range(5):
            status, _ = await asyncio.to_thread(
                server.request, "POST", f"api/kernels/{kernel_id}/restart", None
            )
            assert status == 200
            out = await ws_execute(ws, session, f"print('run {round_}')", timeout=15)
            assert out["stdout"] == f"run {round_}\n", f"restart {round_}: {out}"
    for kernel in kernels:
        assert server.request("DELETE", f"api/kernels/{kernel['id']}")[0] == 204

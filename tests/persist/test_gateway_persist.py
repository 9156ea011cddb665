"""Gateway mode (a JupyterHub user's server): the user's own Jupyter Server keeps the
session and its notebook's open websocket while our server restarts under it (issue 21).

Our server (the gateway) runs a persisted Docker kernel; a second Jupyter Server with
``--gateway-url`` pointing at it holds the session. The gateway is stopped with SIGTERM and
started again on the same address: the user's server still lists its session with the
same kernel, and the websocket it had open answers again, the variable intact, with no
action from the user (Jupyter Server's GatewayClient reconnects by itself).
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import docker
import pytest
from websockets.asyncio.client import connect

from provisioners.docker import LABEL_KERNEL_ID
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec
from tests.jupyter_server import JupyterServer, persist_server, until_answering, ws_execute

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]


async def test_a_gateway_restart_keeps_the_users_session_and_open_notebook(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    gateway = persist_server(tmp_path / "gateway", sessions=False)
    settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "persist_kernels": True}
    write_kernelspec(
        gateway.kernels, "kept", "cluster-docker-provisioner", settings, argv=CONTAINER_ARGV
    )
    user = JupyterServer(
        tmp_path / "user",
        args=[f"--gateway-url={gateway.base}", f"--GatewayClient.auth_token={gateway.token}"],
    )
    kernel_id = ""
    try:
        with gateway, user:
            status, model = user.request(
                "POST",
                "api/sessions",
                {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "kept"}},
            )
            assert status == 201, model
            kernel_id, session_id = model["kernel"]["id"], model["id"]
            session = uuid.uuid4().hex
            url = user.ws_url(kernel_id, session)
            async with connect(url, additional_headers=user.ws_headers()) as ws:
                out = await ws_execute(ws, session, "kept = 'through the gateway'")
                assert out["status"] == "ok", out

                gateway.stop(signal.SIGTERM)
                assert "Detached 1 kernel" in gateway.log(), gateway.log()
                again = persist_server(
                    tmp_path / "gateway", sessions=False, port=gateway.port, token=gateway.token
                )
                with again:
                    await until_answering(ws, session, timeout=60)
                    out = await ws_execute(ws, session, "print(kept)")
                    assert out["stdout"] == "through the gateway\n", out
                    status, sessions = user.request("GET", "api/sessions")
                    assert status == 200
                    assert [(s["id"], s["kernel"]["id"]) for s in sessions] == [
                        (session_id, kernel_id)
                    ]
                    status, _ = user.request("DELETE", f"api/sessions/{session_id}")
                    assert status == 204
    finally:
        flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
        left = docker_client.api.containers(all=True, filters=flt) if kernel_id else []
        for item in left:
            docker_client.api.remove_container(item["Id"], force=True)
        assert not left, "the kernel's container outlived its deletion"

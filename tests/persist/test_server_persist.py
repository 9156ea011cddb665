"""Kernels outlive their Jupyter Server (issue 21), through a real server and Docker.

The ``provisioners.persist`` extension detaches a persisted kernel as the server stops
(SIGTERM) and the next server adopts it under the same id, before it serves a request:
its notebook session (kept in a sessions database on disk) and its variables survive.
After a SIGKILL the next server adopts the dead server's kernels the same way. A local
kernel is the server's child: it ends with the server, persisted or not.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from provisioners.docker import LABEL_KERNEL_ID
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec
from tests.jupyter_server import http, persist_server, run_code

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

DOCKER = "cluster-docker-provisioner"
LOCAL = "cluster-local-provisioner"


def _containers(client: docker.DockerClient, kernel_id: str) -> list[dict[str, Any]]:
    flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
    return list(client.api.containers(all=True, filters=flt))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_docker_kernel_and_its_session_survive_a_server_restart(
    tmp_path: Path, docker_client: docker.DockerClient, stop: signal.Signals
) -> None:
    first = persist_server(tmp_path, adopt_interval=2)
    settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "persist_kernels": True}
    write_kernelspec(first.kernels, "kept", DOCKER, settings, argv=CONTAINER_ARGV)
    kernel_id = ""
    try:
        with first:
            status, model = first.request(
                "POST",
                "api/sessions",
                {"path": "work.ipynb", "type": "notebook", "kernel": {"name": "kept"}},
            )
            assert status == 201, model
            kernel_id, session_id = model["kernel"]["id"], model["id"]
            out = await run_code(first, kernel_id, "kept_value = 'A-' + str(6 * 7)")
            assert out["status"] == "ok", out
            first.stop(stop)
            assert "Detached 1 kernel" in first.log() or stop == signal.SIGKILL, first.log()
        (running,) = _containers(docker_client, kernel_id)
        assert running["State"] == "running"

        second = persist_server(tmp_path, adopt_interval=2)
        with second:
            status, kernels = second.request("GET", "api/kernels")
            assert status == 200
            assert [k["id"] for k in kernels] == [kernel_id], second.log()
            status, sessions = second.request("GET", "api/sessions")
            assert [(s["id"], s["kernel"]["id"]) for s in sessions] == [(session_id, kernel_id)]
            # asked for its state once adopted: not 'starting' until a websocket nudges it
            states: list[str] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "idle" not in states:
                states.append(
                    second.request("GET", f"api/kernels/{kernel_id}")[1]["execution_state"]
                )
                await asyncio.sleep(0.05)
            assert states[-1] == "idle", states
            out = await run_code(second, kernel_id, "print(kept_value)")
            assert out["stdout"] == "A-42\n", out
            status, body = http("GET", second.base + "metrics", second.token)
            assert status == 200
            adopted = 'cluster_provisioners_adoptions_total{outcome="adopted",target="docker"} 1.0'
            assert adopted in body.decode(), body.decode()
            status, _ = second.request("DELETE", f"api/kernels/{kernel_id}")
            assert status == 204
            assert _containers(docker_client, kernel_id) == []
    finally:
        for item in _containers(docker_client, kernel_id) if kernel_id else []:
            docker_client.api.remove_container(item["Id"], force=True)


async def test_a_local_kernel_ends_with_its_server_even_when_persisted(tmp_path: Path) -> None:
    server = persist_server(tmp_path, adopt_interval=2)
    write_kernelspec(server.kernels, "local-kept", LOCAL, {"persist_kernels": True})
    with server:
        status, model = server.request("POST", "api/kernels", {"name": "local-kept"})
        assert status == 201, model
        out = await run_code(server, model["id"], "import os; print(os.getpid())")
        pid = int(out["stdout"])
    await asyncio.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    second = persist_server(tmp_path, adopt_interval=2)
    with second:
        assert second.request("GET", "api/kernels") == (200, [])

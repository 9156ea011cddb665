"""A Docker kernel through a Jupyter Server with ``provisioners.access``: its
KERNEL_USERNAME is the identity's name whatever the request body says, the body's other
``KERNEL_*`` variables reach it and nothing else does, its container is labelled with
that user, and its owner (the cluster provisioner's ``username``) is the only user who
reaches it, also after a server restart that adopts it (``provisioners.persist``)."""

from __future__ import annotations

from typing import Any

import docker
import pytest

from provisioners.docker import LABEL_KERNEL_ID
from provisioners.docker.daemon import LABEL_USERNAME
from tests.helpers import CONTAINER_ARGV, DOCKER_PROVISIONER, KERNEL_TEST_IMAGE, write_kernelspec

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

CODE = """import os
print(os.environ.get('KERNEL_USERNAME'), os.environ.get('KERNEL_TEAM'), os.environ.get('SNEAKY'))
"""


async def test_a_docker_kernel_runs_as_the_identity_whatever_the_body_says(
    access_server: Any, docker_client: docker.DockerClient
) -> None:
    server = access_server()
    settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False}
    write_kernelspec(server.kernels, "docker", DOCKER_PROVISIONER, settings, argv=CONTAINER_ARGV)
    kernel_id = ""
    try:
        with server:
            alice, bob = server.clients["alice"], server.clients["bob"]
            env = {"KERNEL_USERNAME": "bob", "KERNEL_TEAM": "team-a", "SNEAKY": "yes"}
            status, model = alice.request("POST", "api/kernels", {"name": "docker", "env": env})
            assert status == 201, model
            kernel_id = model["id"]
            out = await alice.run(kernel_id, CODE)
            assert (out["status"], out["stdout"]) == ("ok", "alice team-a None\n"), out
            flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
            (container,) = docker_client.api.containers(filters=flt)
            assert container["Labels"][LABEL_USERNAME] == "alice"
            # bob, whose name the body gave, does not own it
            assert bob.request("GET", "api/kernels") == (200, [])
            assert bob.request("GET", f"api/kernels/{kernel_id}")[0] == 404
            assert await bob.ws_status(kernel_id) == 404
            assert bob.request("DELETE", f"api/kernels/{kernel_id}")[0] == 404
            assert [k["id"] for k in server.admin.request("GET", "api/kernels")[1]] == [kernel_id]
            assert alice.request("DELETE", f"api/kernels/{kernel_id}")[0] == 204
            flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
            assert docker_client.api.containers(all=True, filters=flt) == []
    finally:
        flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
        for item in docker_client.api.containers(all=True, filters=flt) if kernel_id else []:
            docker_client.api.remove_container(item["Id"], force=True)


async def test_a_persisted_kernel_stays_its_users_across_a_server_restart(
    access_server: Any, docker_client: docker.DockerClient
) -> None:
    extensions = {"provisioners.access": True, "provisioners.persist": True}
    config = {
        "ServerApp": {"jpserver_extensions": extensions},
        "PersistExtension": {"adopt_interval": 2},
    }
    first = access_server(config=config)
    settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "persist_kernels": True}
    write_kernelspec(first.kernels, "kept", DOCKER_PROVISIONER, settings, argv=CONTAINER_ARGV)
    kernel_id = ""
    try:
        with first:
            alice = first.clients["alice"]
            status, model = alice.request("POST", "api/kernels", {"name": "kept"})
            assert status == 201, model
            kernel_id = model["id"]
            out = await alice.run(kernel_id, "kept = 'A-' + str(6 * 7)")
            assert out["status"] == "ok", out
        assert "Detached 1 kernel" in first.log(), first.log()

        second = access_server(config=config)  # new tokens, the same user names
        with second:
            alice, bob = second.clients["alice"], second.clients["bob"]
            assert [k["id"] for k in second.admin.request("GET", "api/kernels")[1]] == [kernel_id]
            assert bob.request("GET", "api/kernels") == (200, [])
            assert bob.request("GET", f"api/kernels/{kernel_id}")[0] == 404
            assert await bob.ws_status(kernel_id) == 404
            assert [k["id"] for k in alice.request("GET", "api/kernels")[1]] == [kernel_id]
            out = await alice.run(kernel_id, "print(kept)")
            assert out["stdout"] == "A-42\n", out
            assert alice.request("DELETE", f"api/kernels/{kernel_id}")[0] == 204
    finally:
        flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
        for item in docker_client.api.containers(all=True, filters=flt) if kernel_id else []:
            docker_client.api.remove_container(item["Id"], force=True)

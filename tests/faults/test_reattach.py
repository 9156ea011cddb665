"""A kernel reattached in another server process stays that process's kernel."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import docker
import pytest

from provisioners.connection.ports import ClusterPortCache, process_start_time
from provisioners.docker import DockerClusterProvisioner
from provisioners.local import LocalClusterProvisioner
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    ServerProcess,
    cleanup_cli,
    count,
    execute,
    write_kernelspec,
)


async def test_a_kernel_reattached_after_its_server_died_keeps_running(
    tmp_path: Path, jupyter_dirs: Path
) -> None:
    """Its server is SIGKILLed; this process reattaches from the provisioner info. The
    next unrelated allocation must neither kill the kernel nor delete its connection
    file: its port records (and pid record) now belong to this process."""
    kernel_dir = tmp_path / "kernels"
    ksm = write_kernelspec(kernel_dir, "local", "cluster-local-provisioner")
    server = ServerProcess(kernel_dir, "local", 1, independent=True).wait_ready()
    (started,) = server.kernels
    kernel_id, info = started["kernel_id"], started["info"]
    connection_file = jupyter_dirs / f"kernel-{kernel_id}.json"
    assert connection_file.exists()
    server.kill()
    server.stop()
    count("faults injected", "local")

    fresh = LocalClusterProvisioner(kernel_id=kernel_id, kernel_spec=ksm.get_kernel_spec("local"))
    await fresh.load_provisioner_info(info)
    try:
        cache = ClusterPortCache.instance()
        unrelated = cache.allocate(5, "kernel-unrelated")
        records = cache.held("localhost")["localhost"]
        ours = {p: r for p, r in records.items() if r["owner"] == f"kernel-{kernel_id}"}
        assert sorted(ours) == sorted(info["ports"])
        me = (socket.gethostname(), os.getpid(), process_start_time(os.getpid()))
        for record in ours.values():
            assert (record["hostname"], record["pid"], record["start"]) == me
            assert record["kernel_pid"] == fresh.engine.pid
        assert await fresh.poll() is None
        assert connection_file.exists()
        out = await execute(dict(fresh.connection_info), "print('still here')", timeout=30)
        assert out["stdout"] == "still here\n"
        cache.release("kernel-unrelated", unrelated)
    finally:
        await fresh.kill()
        await fresh.cleanup()
    assert await fresh.poll() == 0
    assert ClusterPortCache.instance().held() == {}
    count("orphans after recovery", "local", 0)


async def test_a_sweep_keeps_a_docker_kernel_reattached_after_its_server_died(
    tmp_path: Path, docker_client: Any
) -> None:
    """A server with two Docker kernels is SIGKILLed; this process reattaches one. A
    cleanup run from another process removes the other, orphaned container and keeps
    the reattached one: this process wrote itself into the container as its owner."""
    kernel_dir = tmp_path / "kernels"
    config = {"image": KERNEL_TEST_IMAGE, "fallback": "none"}
    ksm = write_kernelspec(
        kernel_dir, "docker", "cluster-docker-provisioner", config, argv=CONTAINER_ARGV
    )
    server = ServerProcess(kernel_dir, "docker", 2).wait_ready()
    server.kill()
    server.stop()
    count("faults injected", "docker")
    kept, orphan = server.kernels
    fresh = DockerClusterProvisioner(
        kernel_id=kept["kernel_id"], kernel_spec=ksm.get_kernel_spec("docker"), **config
    )
    try:
        await fresh.load_provisioner_info(kept["info"])
        output = cleanup_cli(kernel_dir)
        assert kept["info"]["state"]["container_id"][:12] not in output
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(orphan["info"]["state"]["container_id"])
        assert await fresh.poll() is None
        out = await execute(dict(fresh.connection_info), "print('kept')", timeout=30)
        assert out["stdout"] == "kept\n"
    finally:
        await fresh.kill()
        await fresh.cleanup()
        for kernel in server.kernels:  # whatever failed above, leave no container
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(
                    kernel["info"]["state"]["container_id"], force=True
                )
    left = docker_client.containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={kept['kernel_id']}"}
    )
    assert left == []
    count("orphans after recovery", "docker", 0)

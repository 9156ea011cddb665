"""Containers left by a server killed with SIGKILL are swept; a live server's never are."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from provisioners.docker import LABEL_MANAGED_BY, LABEL_OWNER, MANAGED_BY, sweep_orphans
from provisioners.docker import daemon as docker_daemon
from provisioners.lifecycle.owner import ServerIdentity
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, execute, write_kernelspec

pytestmark = pytest.mark.docker

#: A "server": starts one docker kernel, reports its container, then waits to be killed.
SERVER = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name="orphan", kernel_spec_manager=ksm)
    await km.start_kernel(kernel_id=sys.argv[2])
    print("STARTED", km.provisioner.engine.container_id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _dead_owner() -> str:
    """The owner text of a server process of this machine that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return str(ServerIdentity(socket.gethostname(), process.pid, "1"))


async def test_sigkilled_server_leaves_containers_that_the_sweep_removes(
    docker_kernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, tracker = docker_kernels
    client = tracker.client

    # A fake leftover of a dead server; the first start of this process sweeps it away.
    stale_id = str(uuid.uuid4())
    tracker.kernel_ids.add(stale_id)
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_OWNER: _dead_owner(),
        docker_daemon.LABEL_KERNEL_ID: stale_id,
    }
    stale = client.containers.create(KERNEL_TEST_IMAGE, ["true"], labels=labels)
    monkeypatch.setattr(docker_daemon, "_SWEPT", set())
    live = make({"sweep_on_start": True})
    await live.start_kernel()
    for _ in range(50):
        if not tracker.containers(stale_id):
            break
        await asyncio.sleep(0.1)
    assert not tracker.containers(stale_id), f"{stale.name} was not swept at first start"

    # A server process starts a kernel and is killed with SIGKILL: its container stays.
    kernels = tmp_path / "server-kernels"
    config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False}
    write_kernelspec(kernels, "orphan", "cluster-docker-provisioner", config, argv=CONTAINER_ARGV)
    orphan_kernel = str(uuid.uuid4())
    tracker.kernel_ids.add(orphan_kernel)
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        str(kernels),
        orphan_kernel,
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 60)
    finally:
        server.send_signal(signal.SIGKILL)
        await server.wait()
    assert line.startswith(b"STARTED"), line
    orphan_id = line.split()[1].decode()
    assert [c["Id"] for c in tracker.containers(orphan_kernel)] == [orphan_id]

    removed = await asyncio.to_thread(sweep_orphans, client, logging.getLogger("test"))
    assert orphan_id in removed
    assert tracker.containers(orphan_kernel) == []
    # the live server's kernel is untouched and still answers
    assert [c["State"] for c in tracker.containers(live.kernel_id)] == ["running"]
    assert (await execute(live, "print('alive')"))["stdout"] == "alive\n"
    await live.shutdown_kernel(now=True)

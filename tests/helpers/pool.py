"""Helpers of the warm-pool tests: what a pool left behind, fills and claims."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import psutil
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners.connection.ports import FilePortStore
from provisioners.docker import LABEL_KERNELSPEC, LABEL_MANAGED_BY, LABEL_OWNER, MANAGED_BY
from provisioners.lifecycle.owner import ServerIdentity
from provisioners.pool import KernelPools
from provisioners.pool.warm import POOL_ID_PREFIX
from tests.helpers import (
    CONTAINER_ARGV,
    DOCKER_PROVISIONER,
    KERNEL_TEST_IMAGE,
    cli_env,
    write_kernelspec,
)

#: Long enough for a pool to fill on a loaded 2-core machine.
FILL_TIMEOUT = 120.0


def our_containers(client: docker.DockerClient, owner: str | None = None) -> list[dict[str, Any]]:
    """Our kernel containers (any state) owned by ``owner`` (this process by default)."""
    owner = owner or str(ServerIdentity.current())
    labels = [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_OWNER}={owner}"]
    return list(client.api.containers(all=True, filters={"label": labels}))


def spec_containers(client: docker.DockerClient, spec_name: str) -> list[dict[str, Any]]:
    """Our containers (any state) of kernelspec ``spec_name``."""
    labels = [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_KERNELSPEC}={spec_name}"]
    return list(client.api.containers(all=True, filters={"label": labels}))


def our_port_records(pid: int | None = None) -> list[str]:
    """Port records in this test's runtime dir held by process ``pid`` (this one)."""
    pid = pid or os.getpid()
    held = FilePortStore().held()
    return [
        f"{host}:{port} ({record.get('owner')})"
        for host, ports in held.items()
        for port, record in ports.items()
        if int(record.get("pid", 0)) == pid
    ]


def warm_processes() -> list[str]:
    """Local kernel processes of this process started for a pool (``pool-`` in argv)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(POOL_ID_PREFIX in arg for arg in child.cmdline()):
                found.append(f"pid {child.pid}")
        except psutil.Error:
            continue
    return found


def ready(spec_name: str, n: int) -> Callable[[], bool]:
    """A check: the pool of ``spec_name`` holds ``n`` ready warm kernels."""

    def check() -> bool:
        pools = [p for p in KernelPools.instance().pools() if p.spec_name == spec_name]
        return bool(pools) and len(pools[0].ready) >= n

    return check


def fill(km: AsyncKernelManager) -> None:
    """Create the pool of ``km``'s kernelspec now (as its first claim, or the server
    extension's prefill, does)."""
    factory = KernelProvisionerFactory.instance()
    template = factory.create_provisioner_instance(
        f"fill-{uuid.uuid4()}", km.kernel_spec, parent=km
    )
    KernelPools.instance().ensure(template)


def claimed(km: AsyncKernelManager) -> bool:
    """True when ``km``'s kernel is a claimed warm kernel (not a cold start)."""
    engine = km.provisioner.engine  # type: ignore[union-attr]
    return bool(engine.claimed_from) and engine.kernel_id == km.kernel_id


async def run_pooled_script(
    script: str, kernel_dir: Path, spec: str, pool_size: int, *args: str
) -> subprocess.CompletedProcess[str]:
    """Write Docker kernelspec ``spec`` with a pool of ``pool_size`` into ``kernel_dir``
    and run ``script`` (argv: ``kernel_dir``, ``spec``, ``args``) in a process of its own
    (it may import :mod:`tests.helpers`)."""
    config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "pool_size": pool_size}
    write_kernelspec(kernel_dir, spec, DOCKER_PROVISIONER, config, argv=CONTAINER_ARGV)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, str(kernel_dir), spec, *args],
        capture_output=True,
        text=True,
        timeout=FILL_TIMEOUT * 2 + 120,
        env=cli_env(),
    )

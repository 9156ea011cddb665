"""Fixtures of the warm-pool suite: fresh ``KernelPools`` per test, drained and checked.

After each test every pool is drained; then nothing of this process may be left: no
container of ours owned by this process (warm or claimed), no port record held by this
process, no warm local kernel process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from provisioners.connection.ports import FilePortStore
from provisioners.docker import LABEL_MANAGED_BY, LABEL_OWNER, MANAGED_BY
from provisioners.owner import ServerIdentity
from provisioners.pool import KernelPools
from provisioners.pool.warm import POOL_ID_PREFIX

#: How long the engine may take to let go of what a drain removed.
LEFTOVER_WAIT = 20.0


def our_containers(client: docker.DockerClient, owner: str | None = None) -> list[dict[str, Any]]:
    """Our kernel containers (any state) owned by ``owner`` (this process by default)."""
    owner = owner or str(ServerIdentity.current())
    labels = [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_OWNER}={owner}"]
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


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync) until it returns something true; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert loop.time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.1)


def ready(spec_name: str, n: int) -> Callable[[], bool]:
    """A check: the pool of ``spec_name`` holds ``n`` ready warm kernels."""

    def check() -> bool:
        pools = [p for p in KernelPools.instance().pools() if p.spec_name == spec_name]
        return bool(pools) and len(pools[0].ready) >= n

    return check


@pytest.fixture(autouse=True)
async def kernel_pools(jupyter_dirs: Path) -> AsyncIterator[KernelPools]:
    """A fresh ``KernelPools`` for the test; drained after it, and nothing may be left."""
    KernelPools.clear_instance()
    pools = KernelPools.instance()
    yield pools
    await pools.drain()
    KernelPools.clear_instance()
    runtime = jupyter_dirs
    client = docker.from_env(timeout=30)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEFTOVER_WAIT
        while True:
            left = [f"container {c['Names'][0]}" for c in our_containers(client)]
            left += [f"port record {r}" for r in our_port_records()]
            left += [f"warm kernel process {p}" for p in warm_processes()]
            left += [f"file {p.name}" for p in runtime.glob(f"kernel-{POOL_ID_PREFIX}*")]
            if not left or loop.time() > deadline:
                break
            await asyncio.sleep(0.3)
        for item in our_containers(client):
            client.api.remove_container(item["Id"], force=True, v=True)
    finally:
        client.close()
    assert not left, f"left behind after the pools were drained: {left}"

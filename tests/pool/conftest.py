"""Fixtures of the warm-pool suite: fresh ``KernelPools`` per test, drained and checked.

After each test every pool is drained; then nothing of this process may be left: no
container of ours owned by this process (warm or claimed), no port record held by this
process, no warm local kernel process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from provisioners.pool import KernelPools
from provisioners.pool.warm import POOL_ID_PREFIX
from tests.helpers.pool import our_containers, our_port_records, warm_processes

#: How long the engine may take to let go of what a drain removed.
LEFTOVER_WAIT = 20.0


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

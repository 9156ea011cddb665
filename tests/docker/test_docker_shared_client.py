"""Docker kernels of one process share one client per daemon, and polls read its events.

An idle Docker kernel used to hold its own docker-py client, with a unix socket to dockerd
per API path it had called (7 per kernel), and every poll of the restarter was an API
call. Now the sockets to dockerd stay as many as kernels are added, one kernel's shutdown
never closes the client under another, and a poll is answered from the daemon's event
stream, which still notices a container killed behind our back.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from traitlets.config import Config

from provisioners.docker import DOCKER_EXECUTOR
from provisioners.docker.shared import SharedDaemon
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, execute, write_kernelspec

pytestmark = pytest.mark.docker


def unix_sockets() -> int:
    """Unix-domain sockets this process holds open (its connections to dockerd)."""
    inodes = set()
    with open("/proc/net/unix") as table:
        next(table)
        inodes = {line.split()[6] for line in table if len(line.split()) > 6}
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            found += 1
    return found


async def _polled(km: Any) -> int | None:
    return await km.provisioner.poll()


async def test_kernels_share_one_client_and_the_sockets_to_dockerd_stay(
    docker_kernels: Any, docker_client: Any
) -> None:
    make, _ = docker_kernels
    held = {daemon.key: daemon.users for daemon in SharedDaemon.active()}
    first = make()
    await first.start_kernel()
    assert (await execute(first, "x = 1"))["status"] == "ok"
    assert await _polled(first) is None
    baseline = unix_sockets()

    others = [make() for _ in range(6)]
    for km in others:
        await km.start_kernel()
        assert (await execute(km, "print('up')"))["stdout"] == "up\n"
    kernels = [first, *others]
    for _ in range(5):  # the restarter's polls, all kernels at once
        assert await asyncio.gather(*(_polled(km) for km in kernels)) == [None] * len(kernels)
    grown = unix_sockets() - baseline
    # at most one idle connection per call that ran at once (the engine's threads), not
    # one per kernel: 6 more kernels held 42 more before
    assert grown <= DOCKER_EXECUTOR.max_workers, f"{grown} more unix sockets for 6 kernels"

    engines = [km.provisioner.engine for km in kernels]
    shared = engines[0].shared_daemon
    assert shared is not None and all(e.shared_daemon is shared for e in engines)
    assert all(e.client is shared.client for e in engines)
    assert shared.streaming, "the daemon's event stream is not up"
    for engine in engines:  # every poll now comes from the event stream
        assert shared.cached_state(engine.container_id) == (True, 0)

    # a container killed behind our back: its death comes from the stream
    victim = engines[1].container_id
    docker_client.api.kill(victim)
    deadline = time.monotonic() + 10
    while await _polled(others[0]) is None:
        assert time.monotonic() < deadline, "the killed container still polls as running"
        await asyncio.sleep(0.2)
    assert shared.cached_state(victim) == (False, 137)
    assert await _polled(first) is None, "a live kernel polled as dead"

    # one kernel's shutdown never closes the client under the others
    await first.shutdown_kernel(now=True)
    await others[0].shutdown_kernel(now=True)
    assert not shared.closed
    for km in others[1:]:
        assert (await execute(km, "print('still')"))["stdout"] == "still\n"
        assert await _polled(km) is None
    for km in others[1:]:
        await km.shutdown_kernel(now=True)
    if shared.key in held:  # another test's kernel still holds it
        assert shared.users == held[shared.key], "our kernels still hold the client"
    else:
        assert shared.closed, "the last kernel's shutdown left the shared client open"
    assert all(e.client is None for e in engines)
    assert unix_sockets() <= baseline


async def test_a_killed_container_is_restarted_by_the_restarter(
    tmp_path: Path, docker_kernels: Any, docker_client: Any
) -> None:
    """``docker kill`` of a kernel's container: the restarter's poll, read from the event
    stream, notices it, and the kernel comes back on a new container."""
    _, tracker = docker_kernels
    config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False}
    ksm = write_kernelspec(
        tmp_path / "kernels", "killed", "cluster-docker-provisioner", config, argv=CONTAINER_ARGV
    )
    restarter = Config({"KernelRestarter": {"time_to_dead": 0.5}})
    km = AsyncIOLoopKernelManager(kernel_name="killed", kernel_spec_manager=ksm, config=restarter)
    await km.start_kernel()
    tracker.kernel_ids.add(km.kernel_id)
    try:
        engine = km.provisioner.engine
        first = engine.container_id
        assert (await execute(km, "x = 41"))["status"] == "ok"
        await asyncio.sleep(1.5)  # the restarter polled: the stream vouches for the kernel
        assert engine.shared_daemon.cached_state(first) == (True, 0)

        docker_client.api.kill(first)

        async def answers() -> bool:
            try:
                return (await execute(km, "print('back')", timeout=5))["stdout"] == "back\n"
            except Exception:
                return False

        deadline = time.monotonic() + 60
        while engine.container_id in ("", first) or not await answers():
            assert time.monotonic() < deadline, "the restarter did not restart the kernel"
            await asyncio.sleep(0.5)
    finally:
        km.stop_restarter()
        await km.shutdown_kernel(now=True)

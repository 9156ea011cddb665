"""One sick engine never stalls the others: a frozen SSH host (its sshd stopped with
SIGSTOP) under running and starting SSH kernels leaves local and Docker starts as fast
as they were before the freeze, measured in the same test."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.connection.ports import ClusterPortCache
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    LOCAL_ARGV,
    count,
    execute,
    start_sshd,
)

pytestmark = [pytest.mark.ssh, pytest.mark.docker]

#: SSH calls kept waiting on the frozen host: one poll each of this many SSH kernels'
#: restarters, more than the default executor's threads on a small machine.
FROZEN_POLLS = 8
#: Seconds each remote command may take: what a call waiting on the frozen host costs.
COMMAND_TIMEOUT = 30.0


@contextlib.contextmanager
def frozen(proc_pid: int) -> Iterator[list[psutil.Process]]:
    """SIGSTOP an sshd and every session process under it; SIGCONT them on exit."""
    root = psutil.Process(proc_pid)
    stopped: list[psutil.Process] = []
    try:
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)
                stopped.append(proc)
        yield stopped
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


async def timed_start(
    make: Callable[..., AsyncKernelManager],
    provisioner: str,
    config: dict[str, Any],
    argv: list[str],
) -> float:
    """Seconds ``start_kernel`` takes; the kernel then answers and is shut down."""
    km = make(provisioner, config, argv=argv)
    began = time.monotonic()
    await km.start_kernel()
    elapsed = time.monotonic() - began
    try:
        assert (await execute(km, "print('unaffected')"))["stdout"] == "unaffected\n"
    finally:
        await km.shutdown_kernel(now=True)
    return elapsed


async def test_frozen_ssh_host_does_not_stall_local_and_docker_starts(
    kernel_manager: Callable[..., AsyncKernelManager], docker_client: Any, tmp_path: Path
) -> None:
    sshd = start_sshd(tmp_path / "sshd")
    remote_runtime = tmp_path / "remote-runtime"
    remote_runtime.mkdir()
    ssh_config = sshd.kernel_config(
        remote_runtime, command_timeout=COMMAND_TIMEOUT, fallback="none"
    )
    ssh_argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    docker_config = {"image": KERNEL_TEST_IMAGE}
    stuck: list[asyncio.Task[Any]] = []
    ssh_kernels: list[AsyncKernelManager] = []
    try:
        # Baselines, on this machine and in this run.
        await timed_start(kernel_manager, "cluster-local-provisioner", {}, LOCAL_ARGV)
        local_base = await timed_start(kernel_manager, "cluster-local-provisioner", {}, LOCAL_ARGV)
        docker_base = await timed_start(
            kernel_manager, "cluster-docker-provisioner", docker_config, CONTAINER_ARGV
        )

        running = kernel_manager("cluster-ssh-provisioner", ssh_config, argv=ssh_argv)
        starting = kernel_manager("cluster-ssh-provisioner", ssh_config, argv=ssh_argv)
        ssh_kernels += [running, starting]
        await running.start_kernel()
        assert (await execute(running, "print('ssh')"))["stdout"] == "ssh\n"

        assert sshd.proc is not None
        with frozen(sshd.proc.pid):
            count("faults injected", "ssh")
            # The restarters' polls of a host's kernels, and one more SSH kernel starting.
            stuck = [asyncio.create_task(running.is_alive()) for _ in range(FROZEN_POLLS)]
            stuck.append(asyncio.create_task(starting.start_kernel()))
            await asyncio.sleep(1.0)
            assert not any(task.done() for task in stuck), "the SSH calls did not block"

            local = await timed_start(kernel_manager, "cluster-local-provisioner", {}, LOCAL_ARGV)
            docker = await timed_start(
                kernel_manager, "cluster-docker-provisioner", docker_config, CONTAINER_ARGV
            )
            # Generous margins for a loaded 2-core machine; a stall costs COMMAND_TIMEOUT.
            assert local < 3 * local_base + 5, (local, local_base)
            assert docker < 3 * docker_base + 5, (docker, docker_base)
            assert not all(task.done() for task in stuck), "the host thawed too early"

        # Thawed: the stuck calls finish and the SSH kernels still work.
        await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), 60)
        assert await running.is_alive()
        for km in (running, starting):
            assert (await execute(km, "print('thawed')"))["stdout"] == "thawed\n"
    finally:
        # The host is thawed here: what got stuck finishes, then the SSH kernels stop.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), 60)
        for km in ssh_kernels:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        sshd.stop()
    left = [p.name for p in remote_runtime.iterdir()]
    count("orphans found after sweep", "ssh", len(left))
    assert left == []
    assert ClusterPortCache.instance().held() in ({}, {"localhost": {}})

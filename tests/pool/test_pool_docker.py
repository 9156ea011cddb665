"""Warm Docker kernel pools on the real engine: claims, refill, names, concurrency,
restart and the cold-start rule, each kernel executing code."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners.pool import KernelPools
from provisioners.targets import provisioner_for
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, execute
from tests.pool.conftest import our_containers, ready, wait_for

pytestmark = pytest.mark.docker

DOCKER = "cluster-docker-provisioner"
#: Long enough for a pool to fill on a loaded 2-core machine.
FILL_TIMEOUT = 120.0


def docker_kernels(
    kernel_manager: Callable[..., AsyncKernelManager], name: str, pool_size: int, **config: Any
) -> Callable[[], AsyncKernelManager]:
    """A factory of kernel managers of one pooled Docker kernelspec ``name``."""
    settings = {
        "image": KERNEL_TEST_IMAGE,
        "sweep_on_start": False,
        "pool_size": pool_size,
        **config,
    }

    def make() -> AsyncKernelManager:
        return kernel_manager(DOCKER, settings, argv=CONTAINER_ARGV, name=name)

    return make


def fill(km: AsyncKernelManager) -> None:
    """Create the pool of ``km``'s kernelspec now (as the first provisioner for it does)."""
    factory = KernelProvisionerFactory.instance()
    factory.create_provisioner_instance(f"fill-{uuid.uuid4()}", km.kernel_spec, parent=km)


def claimed(km: AsyncKernelManager) -> bool:
    """True when ``km``'s kernel is a claimed warm kernel (not a cold start)."""
    runner = km.provisioner.runner  # type: ignore[union-attr]
    return runner is not km.provisioner and runner.kernel_id == km.kernel_id


async def test_docker_pool_claims_refills_and_renames(
    docker_client: Any, kernel_manager: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    make = docker_kernels(kernel_manager, "pooled", 2)
    first, second = make(), make()
    fill(first)
    await wait_for(ready("pooled", 2), FILL_TIMEOUT, "2 warm kernels")

    await first.start_kernel(kernel_id=str(uuid.uuid4()))
    assert claimed(first), caplog.text
    assert f"Kernel {first.kernel_id} (docker): claimed: warm kernel pool-" in caplog.text
    assert (await execute(first, "print(6 * 7)"))["stdout"] == "42\n"
    await second.start_kernel(kernel_id=str(uuid.uuid4()))
    assert claimed(second), caplog.text
    assert (await execute(second, "print('second')"))["stdout"] == "second\n"
    # each claimed kernel has its own key, the one its manager signs with
    assert first.session.key != second.session.key
    for km in (first, second):
        assert km.session.key == km.get_connection_info()["key"]
    await wait_for(ready("pooled", 2), FILL_TIMEOUT, "the pool to refill to 2")

    # the claimed containers carry the real kernel id in their names ...
    for km in (first, second):
        name = km.provisioner.runner.container_name  # type: ignore[union-attr]
        assert name.startswith(f"jupyter-kernel-{km.kernel_id}-"), name
        assert docker_client.containers.get(name).status == "running"
    # ... so list shows them under it; unclaimed ones are "warm"
    rows = await first.provisioner.list_kernels()  # type: ignore[union-attr]
    states = {r["kernel_id"]: r["state"] for r in rows if r.get("kernelspec") == "pooled"}
    mine = {k: v for k, v in states.items() if k in (first.kernel_id, second.kernel_id)}
    assert mine == {first.kernel_id: "running", second.kernel_id: "running"}, states
    warm = {k: v for k, v in states.items() if k.startswith("pool-")}
    assert list(warm.values()) == ["warm", "warm"], states
    assert len(our_containers(docker_client)) == 4

    command = [sys.executable, "-m", "provisioners", "list", "--json"]
    listed = subprocess.run(
        [*command, "--kernel-dir", str(tmp_path / "kernels")],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=True,
    )
    cli = {r["kernel_id"]: r for r in json.loads(listed.stdout)}
    assert cli[first.kernel_id]["state"] == "running", cli
    assert cli[first.kernel_id]["ports"], cli  # the port records moved to the real id
    assert sorted(cli[k]["state"] for k in warm) == ["warm", "warm"], cli
    # listing (or cleaning up) a pooled kernelspec never fills a pool in that process
    assert provisioner_for(first.kernel_spec).pool_size == 0
    assert len(our_containers(docker_client)) == 4

    for km in (first, second):
        await km.shutdown_kernel(now=True)


async def test_ten_concurrent_starts_claim_ten_warm_kernels(
    docker_client: Any, kernel_manager: Any, kernel_pools: KernelPools
) -> None:
    kernel_pools.max_total = 10
    make = docker_kernels(kernel_manager, "pooled10", 10)
    managers = [make() for _ in range(10)]
    fill(managers[0])
    await wait_for(ready("pooled10", 10), FILL_TIMEOUT * 2, "10 warm kernels")
    await asyncio.gather(*(km.start_kernel(kernel_id=str(uuid.uuid4())) for km in managers))
    assert all(claimed(km) for km in managers), [claimed(km) for km in managers]
    containers = {km.provisioner.runner.container_id for km in managers}  # type: ignore[union-attr]
    assert len(containers) == 10
    assert len({km.session.key for km in managers}) == 10
    outs = await asyncio.gather(*(execute(km, f"print({i} ** 2)") for i, km in enumerate(managers)))
    assert [o["stdout"] for o in outs] == [f"{i**2}\n" for i in range(10)]
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))


async def test_request_inputs_start_cold_and_leave_the_pool_alone(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    make = docker_kernels(kernel_manager, "pooled-cold", 1)
    km = make()
    fill(km)
    await wait_for(ready("pooled-cold", 1), FILL_TIMEOUT, "a warm kernel")
    (pool,) = KernelPools.instance().pools()
    warm_ids = [w.kernel_id for w in pool.ready]
    # what jupyter_server passes: the server's environment plus the request's values
    env = {**os.environ, "KERNEL_FOO": "bar"}
    await km.start_kernel(kernel_id=str(uuid.uuid4()), env=env)
    assert not claimed(km)
    assert (
        f"Kernel {km.kernel_id}: cold start, not from the pool: the request sets KERNEL_FOO"
        in caplog.text
    )
    out = await execute(km, "import os; print(os.environ.get('KERNEL_FOO'))")
    assert out["stdout"] == "bar\n"
    assert [w.kernel_id for w in pool.ready] == warm_ids and pool.starting == 0
    await km.shutdown_kernel(now=True)


async def test_restart_of_a_claimed_kernel_is_in_place(
    docker_client: Any, kernel_manager: Any
) -> None:
    km = docker_kernels(kernel_manager, "pooled-restart", 1)()
    fill(km)
    await wait_for(ready("pooled-restart", 1), FILL_TIMEOUT, "a warm kernel")
    kernel_id = str(uuid.uuid4())
    await km.start_kernel(kernel_id=kernel_id)
    assert claimed(km)
    key = km.session.key
    runner: Any = km.provisioner.runner  # type: ignore[union-attr]
    before = runner.container_id
    assert (await execute(km, "x = 1; print(x)"))["stdout"] == "1\n"
    await km.restart_kernel(now=True)
    assert km.kernel_id == kernel_id and km.session.key == key
    assert km.get_connection_info()["key"] == key
    out = await execute(km, "print('x' in dir())")
    assert out["stdout"] == "False\n"  # a fresh kernel, same id and key
    assert runner.container_id != before
    assert runner.container_name.startswith(f"jupyter-kernel-{kernel_id}-")
    assert not docker_client.api.containers(all=True, filters={"id": before})
    await km.shutdown_kernel(now=True)

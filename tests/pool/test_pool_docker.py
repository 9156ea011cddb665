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

from provisioners.exceptions import ProvisionerConfigError
from provisioners.pool import KernelPools
from provisioners.targets import provisioner_for
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    async_wait_for,
    execute,
    reattached_manager,
)
from tests.helpers.pool import FILL_TIMEOUT, claimed, fill, our_containers, ready
from tests.security.wire import CURVE, execute_recorded

pytestmark = pytest.mark.docker

DOCKER = "cluster-docker-provisioner"


def docker_kernels(
    kernel_manager: Callable[..., AsyncKernelManager],
    name: str,
    pool_size: int,
    metadata: dict[str, Any] | None = None,
    **config: Any,
) -> Callable[[], AsyncKernelManager]:
    """A factory of kernel managers of one pooled Docker kernelspec ``name``
    (``metadata``: more kernelspec metadata)."""
    settings = {
        "image": KERNEL_TEST_IMAGE,
        "sweep_on_start": False,
        "pool_size": pool_size,
        **config,
    }

    def make() -> AsyncKernelManager:
        return kernel_manager(DOCKER, settings, argv=CONTAINER_ARGV, name=name, metadata=metadata)

    return make


async def test_docker_pool_claims_refills_and_renames(
    docker_client: Any, kernel_manager: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    make = docker_kernels(kernel_manager, "pooled", 2)
    first, second = make(), make()
    fill(first)
    await async_wait_for(ready("pooled", 2), FILL_TIMEOUT, "2 warm kernels")

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
    await async_wait_for(ready("pooled", 2), FILL_TIMEOUT, "the pool to refill to 2")

    # the claimed containers carry the real kernel id in their names ...
    for km in (first, second):
        name = km.provisioner.engine.container_name  # type: ignore[union-attr]
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
    # listing (or cleaning up) a pooled kernelspec never fills a pool in that process,
    # nor does a provisioner built for it here (pools are made at a claim or by the server)
    pools = KernelPools.instance().pools()
    assert provisioner_for(first.kernel_spec).pool_size == 2
    assert KernelPools.instance().pools() == pools
    assert len(our_containers(docker_client)) == 4

    for km in (first, second):
        await km.shutdown_kernel(now=True)
    # a drain removes the warm kernels and stops refilling
    await KernelPools.instance().drain()
    assert not KernelPools.instance().pools() and not our_containers(docker_client)


async def test_ten_concurrent_starts_claim_ten_warm_kernels(
    docker_client: Any, kernel_manager: Any, kernel_pools: KernelPools
) -> None:
    kernel_pools.max_total = 10
    make = docker_kernels(kernel_manager, "pooled10", 10)
    managers = [make() for _ in range(10)]
    fill(managers[0])
    await async_wait_for(ready("pooled10", 10), FILL_TIMEOUT * 2, "10 warm kernels")
    await asyncio.gather(*(km.start_kernel(kernel_id=str(uuid.uuid4())) for km in managers))
    await kernel_pools.drain()  # no refill of 10 more on 2 cores
    assert all(claimed(km) for km in managers), [claimed(km) for km in managers]
    containers = {km.provisioner.engine.container_id for km in managers}  # type: ignore[union-attr]
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
    await async_wait_for(ready("pooled-cold", 1), FILL_TIMEOUT, "a warm kernel")
    (pool,) = KernelPools.instance().pools()
    warm_ids = [w.kernel_id for w in pool.ready]
    # what jupyter_server passes: the server's environment plus the request's values
    value = "bar; $(touch /tmp/pwn) '\"`id`"  # hostile: reaches the kernel as text only
    env = {**os.environ, "KERNEL_FOO": value}
    await km.start_kernel(kernel_id=str(uuid.uuid4()), env=env)
    assert not claimed(km)
    assert (
        f"Kernel {km.kernel_id}: cold start, not from the pool: the request sets KERNEL_FOO"
        in caplog.text
    )
    out = await execute(km, "import os; print(os.environ.get('KERNEL_FOO'))")
    assert out["stdout"] == value + "\n"
    assert [w.kernel_id for w in pool.ready] == warm_ids and pool.starting == 0
    await km.shutdown_kernel(now=True)


async def test_a_warm_kernel_that_died_is_never_claimed(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    km = docker_kernels(kernel_manager, "pooled-dead", 1)()
    fill(km)
    await async_wait_for(ready("pooled-dead", 1), FILL_TIMEOUT, "a warm kernel")
    (pool,) = KernelPools.instance().pools()
    dead = pool.ready[0]
    docker_client.api.kill(dead.container_id)  # type: ignore[attr-defined]
    await km.start_kernel(kernel_id=str(uuid.uuid4()))
    assert not claimed(km)
    assert f"Warm docker kernel {dead.kernel_id} had exited; removing it" in caplog.text
    assert f"Kernel {km.kernel_id}: cold start, no warm kernel is ready" in caplog.text
    assert (await execute(km, "print('cold')"))["stdout"] == "cold\n"
    await async_wait_for(
        lambda: not docker_client.api.containers(all=True, filters={"id": dead.container_id}),  # type: ignore[attr-defined]
        30,
        "the dead warm container to be removed",
    )
    await km.shutdown_kernel(now=True)


async def test_a_claim_the_engine_refuses_starts_cold_and_removes_the_warm_kernel(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    km = docker_kernels(kernel_manager, "pooled-refused", 1)()
    fill(km)
    await async_wait_for(ready("pooled-refused", 1), FILL_TIMEOUT, "a warm kernel")
    (pool,) = KernelPools.instance().pools()
    warm: Any = pool.ready[0]
    pool_id, kernel_id = warm.kernel_id, str(uuid.uuid4())
    # a container already holds the name the claim renames the warm one to
    suffix = warm.container_name.rsplit("-", 1)[-1]
    blocker = docker_client.containers.create(
        KERNEL_TEST_IMAGE, ["true"], name=f"jupyter-kernel-{kernel_id}-{suffix}"
    )
    try:
        await km.start_kernel(kernel_id=kernel_id)
        assert not claimed(km)
        assert (
            f"Kernel {kernel_id}: claiming warm kernel {pool_id} failed; removing it, "
            "starting cold" in caplog.text
        ), caplog.text
        assert (await execute(km, "print('cold')"))["stdout"] == "cold\n"
        assert not docker_client.api.containers(all=True, filters={"id": warm.container_id})
        await km.shutdown_kernel(now=True)
    finally:
        blocker.remove(force=True)


async def test_a_claimed_kernel_reattaches_in_another_manager(
    docker_client: Any, kernel_manager: Any
) -> None:
    km = docker_kernels(kernel_manager, "pooled-reattach", 1)()
    fill(km)
    await async_wait_for(ready("pooled-reattach", 1), FILL_TIMEOUT, "a warm kernel")
    await km.start_kernel(kernel_id=str(uuid.uuid4()))
    assert claimed(km)
    await KernelPools.instance().drain()
    await execute(km, "state = 'kept'")
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))  # type: ignore[union-attr]
    assert info["kernel_id"] == km.kernel_id and km.session.key.decode() not in json.dumps(
        info["state"]
    )
    km2 = await reattached_manager(km, info)
    assert (await execute(km2, "print(state)"))["stdout"] == "kept\n"
    await km2.shutdown_kernel(now=True)
    await km.shutdown_kernel(now=True)  # the first manager copes with a gone container
    assert not our_containers(docker_client)


async def test_first_start_fills_the_pool_and_a_claimed_kernel_restarts_in_place(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    make = docker_kernels(kernel_manager, "pooled-restart", 1)
    first, km = make(), make()
    # the kernelspec's first start creates its pool; it is cold itself
    await first.start_kernel(kernel_id=str(uuid.uuid4()))
    assert not claimed(first)
    assert f"Kernel {first.kernel_id}: cold start, no warm kernel is ready" in caplog.text
    await first.shutdown_kernel(now=True)
    await async_wait_for(ready("pooled-restart", 1), FILL_TIMEOUT, "a warm kernel")
    kernel_id = str(uuid.uuid4())
    await km.start_kernel(kernel_id=kernel_id)
    assert claimed(km)
    await KernelPools.instance().drain()  # no refill needed here
    key = km.session.key
    runner: Any = km.provisioner.engine  # type: ignore[union-attr]
    before = runner.container_id
    assert (await execute(km, "x = 1; print(x)"))["stdout"] == "1\n"
    for newports in (False, True):  # as jupyter_client's restarter does; both keep the ports
        ports = list(runner.ports)
        await km.restart_kernel(now=True, newports=newports)
        assert km.kernel_id == kernel_id and km.session.key == key
        assert km.get_connection_info()["key"] == key
        out = await execute(km, "print('x' in dir())")
        assert out["stdout"] == "False\n"  # a fresh kernel, same id and key
        assert runner.container_id != before
        assert runner.container_name.startswith(f"jupyter-kernel-{kernel_id}-")
        assert not docker_client.api.containers(all=True, filters={"id": before})
        assert runner.ports == ports
        before = runner.container_id
    await km.shutdown_kernel(now=True)


SECURITY_CODE = """\
import os, stat
from ipykernel.connect import get_connection_file
print(os.environ.get("POOL_SERVER_SECRET"))
print(oct(stat.S_IMODE(os.stat(get_connection_file()).st_mode)))
"""


async def test_security_table_holds_for_a_claimed_kernel(
    docker_client: Any,
    kernel_manager: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # a server secret, in the server's environment before the pool fills
    monkeypatch.setenv("POOL_SERVER_SECRET", "server-secret-do-not-leak")
    km = docker_kernels(kernel_manager, "pooled-sec", 1)()
    fill(km)
    await async_wait_for(ready("pooled-sec", 1), FILL_TIMEOUT, "a warm kernel")
    # with the server's environment, as jupyter_server passes it
    await km.start_kernel(kernel_id=str(uuid.uuid4()), env=dict(os.environ))
    assert claimed(km)
    out = await execute(km, SECURITY_CODE)
    assert out["stdout"] == "None\n0o600\n", out
    runner: Any = km.provisioner.engine  # type: ignore[union-attr]
    attrs = docker_client.api.inspect_container(runner.container_id)
    shown = json.dumps(attrs)
    key = km.session.key.decode()
    assert key not in shown, "the HMAC key shows in docker inspect"
    assert "server-secret-do-not-leak" not in shown
    assert not any(e.startswith("POOL_SERVER_SECRET=") for e in attrs["Config"]["Env"] or [])
    await km.shutdown_kernel(now=True)
    assert key not in caplog.text, "the HMAC key was logged"

    # a hostile kernel id is refused before a warm kernel is taken: the pool keeps it
    await async_wait_for(ready("pooled-sec", 1), FILL_TIMEOUT, "the pool to refill")
    (pool,) = KernelPools.instance().pools()
    warm_ids = [w.kernel_id for w in pool.ready]
    hostile = docker_kernels(kernel_manager, "pooled-sec", 1)()
    with pytest.raises(ProvisionerConfigError, match="kernel id"):
        await hostile.start_kernel(kernel_id="x; $(touch /tmp/pwn) ../../etc")
    assert [w.kernel_id for w in pool.ready] == warm_ids


async def test_curve_pools_and_a_curve_request_against_plain_warm_kernels(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    encrypted = docker_kernels(
        kernel_manager, "pooled-curve", 1, metadata=CURVE, transport_encryption="required"
    )()
    plain = docker_kernels(kernel_manager, "pooled-plain", 1, metadata=CURVE)()
    fill(encrypted)
    fill(plain)
    await async_wait_for(ready("pooled-curve", 1), FILL_TIMEOUT, "a warm Curve kernel")
    await async_wait_for(ready("pooled-plain", 1), FILL_TIMEOUT, "a warm plain kernel")
    (plain_pool,) = [p for p in KernelPools.instance().pools() if p.spec_name == "pooled-plain"]
    assert plain_pool.ready[0].curve_keys is None

    # warm kernels with Curve keys: the claimed one runs encrypted with its own keypair
    await encrypted.start_kernel(kernel_id=str(uuid.uuid4()))
    assert claimed(encrypted)
    runner: Any = encrypted.provisioner.engine  # type: ignore[union-attr]
    assert runner.curve_keys is not None
    assert encrypted.curve_publickey == runner.curve_keys[0]
    out, wire = await execute_recorded(encrypted, "print('curve-' + 'canary')")
    assert out["stdout"] == "curve-canary\n", out
    assert wire and b"curve-canary" not in wire and b"execute_request" not in wire

    # a manager requiring Curve is not given a plain warm kernel: cold, encrypted
    plain.transport_encryption = "required"
    await plain.start_kernel(kernel_id=str(uuid.uuid4()))
    assert not claimed(plain)
    assert (
        f"Kernel {plain.kernel_id}: cold start, not from the pool: the request asks for "
        "CurveZMQ encryption" in caplog.text
    )
    assert plain.curve_publickey is not None
    out, wire = await execute_recorded(plain, "print('cold-' + 'canary')")
    assert out["stdout"] == "cold-canary\n", out
    assert b"cold-canary" not in wire
    assert len(plain_pool.ready) == 1  # the warm kernel went back to its pool
    # and no refill is kept on top of it: the pool stays at 1
    await asyncio.sleep(KernelPools.instance().refill_delay + 0.5)
    await async_wait_for(lambda: plain_pool.starting == 0, FILL_TIMEOUT, "any refill to end")
    assert len(plain_pool.ready) == 1
    for km in (encrypted, plain):
        await km.shutdown_kernel(now=True)

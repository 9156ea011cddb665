"""Warm pools of the local target: a claim executes; a request's working dir starts cold."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from provisioners.pool import KernelPools
from tests.helpers import LOCAL_ARGV, async_wait_for, execute
from tests.helpers.pool import claimed, fill, ready


async def test_local_pool_claims_and_a_request_cwd_starts_cold(
    kernel_manager: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = {"pool_size": 1, "inherit_server_env": False}

    def make() -> Any:
        return kernel_manager("cluster-local-provisioner", config, argv=LOCAL_ARGV, name="local")

    warm, cold = make(), make()
    fill(warm)
    await async_wait_for(ready("local", 1), 60, "a warm local kernel")
    # the server's own working dir: claims
    await warm.start_kernel(kernel_id=str(uuid.uuid4()), cwd=os.getcwd())
    assert claimed(warm), caplog.text
    out = await execute(warm, "import os; print(os.getcwd())")
    assert out["stdout"] == os.getcwd() + "\n"
    await async_wait_for(ready("local", 1), 60, "the pool to refill")
    (pool,) = KernelPools.instance().pools()
    warm_ids = [w.kernel_id for w in pool.ready]

    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    await cold.start_kernel(kernel_id=str(uuid.uuid4()), cwd=str(elsewhere))
    assert not claimed(cold)
    assert f"Kernel {cold.kernel_id}: cold start, not from the pool: the request's working" in (
        caplog.text
    )
    out = await execute(cold, "import os; print(os.getcwd())")
    assert out["stdout"] == f"{elsewhere}\n"
    assert [w.kernel_id for w in pool.ready] == warm_ids
    for km in (warm, cold):
        await km.shutdown_kernel(now=True)


async def test_max_total_caps_warm_kernels_across_kernelspecs(
    kernel_manager: Any, kernel_pools: KernelPools
) -> None:
    kernel_pools.max_total = 3
    config = {"pool_size": 2, "inherit_server_env": False}
    a, b = (
        kernel_manager("cluster-local-provisioner", config, argv=LOCAL_ARGV, name=name)
        for name in ("capped-a", "capped-b")
    )
    fill(a)
    fill(b)

    def held() -> int:
        return sum(p.held for p in kernel_pools.pools())

    await async_wait_for(lambda: sum(len(p.ready) for p in kernel_pools.pools()) == 3, 60, "3 warm")
    await asyncio.sleep(1)
    assert held() == 3
    # a claim frees room under the cap: the pools refill to 3 in all, not more
    await a.start_kernel(kernel_id=str(uuid.uuid4()))
    await async_wait_for(
        lambda: sum(len(p.ready) for p in kernel_pools.pools()) == 3, 60, "3 again"
    )
    assert held() == 3
    assert (await execute(a, "print('capped')"))["stdout"] == "capped\n"
    await a.shutdown_kernel(now=True)

"""Warm Docker kernels and launch parameters: a warm kernel serves only a start at the
kernelspec's defaults; any other start is cold and the log says why."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest

from provisioners.parameters import LaunchBounds
from provisioners.pool import KernelPools
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, async_wait_for, execute
from tests.helpers.pool import FILL_TIMEOUT, claimed, fill, ready

pytestmark = pytest.mark.docker

PARAMETERS = {
    "cpu": {"type": "number", "minimum": 0.25, "maximum": 2, "default": 1},
    "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
}


async def test_non_default_parameters_start_cold_and_defaults_claim(
    docker_client: Any, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    LaunchBounds.clear_instance()
    caplog.set_level(logging.INFO)
    config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "pool_size": 1}

    def make() -> Any:
        metadata = {"parameters": PARAMETERS}
        return kernel_manager(
            "cluster-docker-provisioner",
            config,
            argv=CONTAINER_ARGV,
            name="pooled-params",
            metadata=metadata,
        )

    first = make()
    fill(first)
    await async_wait_for(ready("pooled-params", 1), FILL_TIMEOUT, "a warm kernel")
    (pool,) = KernelPools.instance().pools()
    warm_ids = [w.kernel_id for w in pool.ready]

    # jupyter_server passes the server's environment plus the request's values
    await first.start_kernel(env={**os.environ, "KERNEL_CPU": "2"})
    assert not claimed(first)
    expected = "cold start, not from the pool: launch parameters differ from the defaults (cpu=2)"
    assert f"Kernel {first.kernel_id}: {expected}" in caplog.text
    cid = first.provisioner.engine.container_id
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, cid)
    assert attrs["HostConfig"]["NanoCpus"] == 2_000_000_000
    assert [w.kernel_id for w in pool.ready] == warm_ids  # the pool was left alone

    # the defaults, one of them given explicitly: the warm kernel serves it
    second = make()
    await second.start_kernel(env={**os.environ, "KERNEL_MODE": "fast"})
    assert claimed(second)
    cid = second.provisioner.engine.container_id
    attrs = await asyncio.to_thread(docker_client.api.inspect_container, cid)
    assert attrs["HostConfig"]["NanoCpus"] == 1_000_000_000  # the warm kernel had the defaults
    out = await execute(second, "import os; print(os.environ['KERNEL_MODE'])")
    assert out["stdout"] == "fast\n"
    for km in (first, second):
        await km.shutdown_kernel(now=True)

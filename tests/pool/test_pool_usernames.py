"""Warm Docker kernels and users: a start naming its user still claims (the claimed
kernel's record gets the user), and a kernelspec whose settings vary by user never claims
(cold, and the log says why)."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from provisioners.pool import KernelPools
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, async_wait_for, execute
from tests.helpers.pool import FILL_TIMEOUT, claimed, fill, ready

pytestmark = pytest.mark.docker

CONFIG = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "pool_size": 1}


async def test_a_claim_records_the_requests_user_on_the_warm_kernel(
    kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    km = kernel_manager(
        "cluster-docker-provisioner", CONFIG, argv=CONTAINER_ARGV, name="pooled-users"
    )
    fill(km)
    await async_wait_for(ready("pooled-users", 1), FILL_TIMEOUT, "a warm kernel")
    # what jupyter_server passes: the server's environment plus the request's values
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice@example.org"})
    assert claimed(km), caplog.text
    assert km.provisioner.username == "alice@example.org"
    assert "(without KERNEL_USERNAME)" in caplog.text
    assert (await execute(km, "print(6 * 7)"))["stdout"] == "42\n"
    rows = await km.provisioner.engine.list_kernels()
    assert [r["username"] for r in rows if r["kernel_id"] == km.kernel_id] == ["alice@example.org"]
    await km.shutdown_kernel(now=True)


async def test_a_kernelspec_varying_by_user_never_claims(
    kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = {**CONFIG, "env": {"HOME_OF": "/home/{username}"}}
    km = kernel_manager(
        "cluster-docker-provisioner", config, argv=CONTAINER_ARGV, name="pooled-per-user"
    )
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "bob"})
    assert not claimed(km)
    why = "cold start, not from the pool: the kernelspec's env vary by user ({username})"
    assert f"Kernel {km.kernel_id}: {why}" in caplog.text
    out = await execute(km, "import os; print(os.environ['HOME_OF'])")
    assert out["stdout"] == "/home/bob\n"
    assert not [p for p in KernelPools.instance().pools() if p.spec_name == "pooled-per-user"]
    await km.shutdown_kernel(now=True)

"""Warm pools of the local target: a claim executes; a request's working dir starts cold."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from provisioners.pool import KernelPools
from tests.helpers import LOCAL_ARGV, execute
from tests.pool.conftest import ready, wait_for
from tests.pool.test_pool_docker import claimed, fill


async def test_local_pool_claims_and_a_request_cwd_starts_cold(
    kernel_manager: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = {"pool_size": 1, "inherit_server_env": False}

    def make() -> Any:
        return kernel_manager("cluster-local-provisioner", config, argv=LOCAL_ARGV, name="local")

    warm, cold = make(), make()
    fill(warm)
    await wait_for(ready("local", 1), 60, "a warm local kernel")
    # the server's own working dir: claims
    await warm.start_kernel(kernel_id=str(uuid.uuid4()), cwd=os.getcwd())
    assert claimed(warm), caplog.text
    out = await execute(warm, "import os; print(os.getcwd())")
    assert out["stdout"] == os.getcwd() + "\n"
    await wait_for(ready("local", 1), 60, "the pool to refill")
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

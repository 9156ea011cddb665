"""What survives a fault: killed servers, concurrent servers, on every target."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from provisioners.connection.ports import ClusterPortCache
from tests.helpers import (
    LEFTOVER_WAIT,
    ServerProcess,
    cleanup_cli,
    count,
    execute,
    wait_for_no_leftovers,
    write_kernelspec,
)
from tests.targets import TargetCase, resolve


async def answers(connection_info: dict[str, Any]) -> bool:
    out = await execute(connection_info, "print('still here')", timeout=30)
    return out["stdout"] == "still here\n"


async def test_orphans_of_a_killed_server_are_swept(target: TargetCase, tmp_path: Path) -> None:
    kernel_dir = tmp_path / "kernels"
    write_kernelspec(kernel_dir, "shared", target.provisioner, target.config, argv=target.argv)
    victim = ServerProcess(kernel_dir, "shared", 2)
    survivor = ServerProcess(kernel_dir, "shared", 1)
    try:
        victim.wait_ready()
        survivor.wait_ready()
        victim_ids = [k["kernel_id"] for k in victim.kernels]
        survivor_id = survivor.kernels[0]["kernel_id"]
        victim.kill()
        count("faults injected", target.name)

        report = cleanup_cli(kernel_dir)
        deadline = time.monotonic() + LEFTOVER_WAIT
        left = [r for k in victim_ids for r in await resolve(target.leftovers(k))]
        while left and time.monotonic() < deadline:  # a local kernel exits with its parent
            await asyncio.sleep(0.5)
            cleanup_cli(kernel_dir)
            left = [r for k in victim_ids for r in await resolve(target.leftovers(k))]
        count("orphans found after sweep", target.name, len(left))
        assert left == [], f"orphans of the killed server remain: {left} ({report})"
        held = ClusterPortCache.instance().held()
        owners = {r["owner"] for ports in held.values() for r in ports.values()}
        assert not any(v in owner for v in victim_ids for owner in owners)

        # the live server's kernel was not touched
        assert await resolve(target.leftovers(survivor_id))
        assert await answers(survivor.kernels[0]["info"]["connection_info"])
    finally:
        victim.proc.kill()
        victim.stop()
        assert survivor.stop() == 0
    await wait_for_no_leftovers(lambda: target.leftovers(survivor_id), f"kernel {survivor_id}")
    assert ClusterPortCache.instance().held() == {}


async def test_twenty_concurrent_starts_across_two_servers(tmp_path: Path) -> None:
    """Two server processes on one host start ten local kernels each at once."""
    kernel_dir = tmp_path / "kernels"
    write_kernelspec(
        kernel_dir, "burst", "cluster-local-provisioner", {"port_range": "28000-28199"}
    )
    servers = [ServerProcess(kernel_dir, "burst", 10) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready(timeout=300)
        kernels = [k for s in servers for k in s.kernels]
        assert len(kernels) == 20
        ports = [
            k["info"]["connection_info"][p]
            for k in kernels
            for p in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
        ]
        assert len(set(ports)) == 100, "a port was handed out twice"
        held = ClusterPortCache.instance().held("localhost").get("localhost", {})
        assert set(held) == set(ports)
        assert all(
            await asyncio.gather(*(answers(k["info"]["connection_info"]) for k in kernels[:4]))
        )
    finally:
        for server in servers:
            assert server.stop() == 0
    assert ClusterPortCache.instance().held() == {}
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    assert [p.name for p in runtime.glob("kernel-*.json")] == []

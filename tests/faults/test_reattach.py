"""A kernel reattached in another server process stays that process's kernel."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from provisioners.connection.ports import ClusterPortCache, process_start_time
from provisioners.local import LocalClusterProvisioner
from tests.faults.test_faults import ServerProcess
from tests.helpers import count, execute, write_kernelspec


async def test_a_kernel_reattached_after_its_server_died_keeps_running(
    tmp_path: Path, jupyter_dirs: Path
) -> None:
    """Its server is SIGKILLed; this process reattaches from the provisioner info. The
    next unrelated allocation must neither kill the kernel nor delete its connection
    file: its port records (and pid record) now belong to this process."""
    kernel_dir = tmp_path / "kernels"
    ksm = write_kernelspec(kernel_dir, "local", "cluster-local-provisioner")
    server = ServerProcess(kernel_dir, "local", 1, independent=True).wait_ready()
    (started,) = server.kernels
    kernel_id, info = started["kernel_id"], started["info"]
    connection_file = jupyter_dirs / f"kernel-{kernel_id}.json"
    assert connection_file.exists()
    server.kill()
    server.stop()
    count("faults injected", "local")

    fresh = LocalClusterProvisioner(kernel_id=kernel_id, kernel_spec=ksm.get_kernel_spec("local"))
    await fresh.load_provisioner_info(info)
    try:
        cache = ClusterPortCache.instance()
        unrelated = cache.allocate(5, "kernel-unrelated")
        records = cache.held("localhost")["localhost"]
        ours = {p: r for p, r in records.items() if r["owner"] == f"kernel-{kernel_id}"}
        assert sorted(ours) == sorted(info["ports"])
        me = (socket.gethostname(), os.getpid(), process_start_time(os.getpid()))
        for record in ours.values():
            assert (record["hostname"], record["pid"], record["start"]) == me
            assert record["kernel_pid"] == fresh.runner.pid
        assert await fresh.poll() is None
        assert connection_file.exists()
        out = await execute(dict(fresh.connection_info), "print('still here')", timeout=30)
        assert out["stdout"] == "still here\n"
        cache.release("kernel-unrelated", unrelated)
    finally:
        await fresh.kill()
        await fresh.cleanup()
    assert await fresh.poll() == 0
    assert ClusterPortCache.instance().held() == {}
    count("orphans after recovery", "local", 0)

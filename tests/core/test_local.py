"""A real ipykernel through jupyter_client's KernelManager and our local provisioner."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import psutil
import pytest

from provisioners import LocalClusterProvisioner
from provisioners.connection.ports import ClusterPortCache
from tests.helpers import execute, interrupt_busy_loop

LOCAL = "cluster-local-provisioner"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def test_execute_interrupt_restart_shutdown(kernel_manager, jupyter_dirs: Path) -> None:
    before = _children()
    km = kernel_manager(LOCAL, {"port_range": "26000-26999"}, interrupt_mode="signal")
    await km.start_kernel()
    assert isinstance(km.provisioner, LocalClusterProvisioner)
    info = km.get_connection_info()
    assert all(26000 <= info[p] <= 26999 for p in ("shell_port", "iopub_port", "hb_port"))
    out = await execute(km, "print(6 * 7)")
    assert out["stdout"] == "42\n"
    # the five ports are recorded as held by this kernel
    held = ClusterPortCache.instance().held("localhost")["localhost"]
    assert {
        info[p] for p in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
    } == set(held)
    mode = stat.S_IMODE(os.stat(km.connection_file).st_mode)
    assert mode == 0o600

    await interrupt_busy_loop(km, settle=1.0)  # interrupt stops a busy loop

    pid = km.provisioner.engine.pid
    await km.restart_kernel()
    assert km.provisioner.engine.pid != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert km.get_connection_info()["shell_port"] == info["shell_port"]  # ports kept
    out = await execute(km, "import os; print(os.getpid())")
    assert int(out["stdout"]) == km.provisioner.engine.pid

    conn_file = km.connection_file
    await km.shutdown_kernel()
    assert not Path(conn_file).exists()
    assert ClusterPortCache.instance().held() == {}
    await asyncio.sleep(0.2)
    assert _children() - before == set()


async def test_ipc_transport(kernel_manager, tmp_path: Path) -> None:
    km = kernel_manager(LOCAL)
    km.transport = "ipc"
    km.ip = str(tmp_path / "kernel-ipc")
    await km.start_kernel()
    try:
        assert km.get_connection_info()["transport"] == "ipc"
        out = await execute(km, "print('over ipc')")
        assert out["stdout"] == "over ipc\n"
        assert ClusterPortCache.instance().held() == {}  # ipc needs no TCP ports
    finally:
        await km.shutdown_kernel()


async def test_env_filter_switch(kernel_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_ONLY_SECRET", "s3cr3t")
    code = "import os; print(os.environ.get('SERVER_ONLY_SECRET'), os.environ.get('FROM_SPEC'))"
    inherit = kernel_manager(LOCAL, env={"FROM_SPEC": "spec"})
    filtered = kernel_manager(LOCAL, {"inherit_server_env": False}, env={"FROM_SPEC": "spec"})
    for km, expected in ((inherit, "s3cr3t spec\n"), (filtered, "None spec\n")):
        await km.start_kernel()
        try:
            assert (await execute(km, code))["stdout"] == expected
        finally:
            await km.shutdown_kernel()


async def test_provisioner_info_round_trip_reconnects(kernel_manager) -> None:
    km = kernel_manager(LOCAL)
    await km.start_kernel()
    try:
        info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
        assert info["version"] == 1 and info["target"] == "local"
        fresh = LocalClusterProvisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec)
        await fresh.load_provisioner_info(info)
        assert await fresh.poll() is None
        assert (await execute(fresh.connection_info, "print('again')"))["stdout"] == "again\n"
    finally:
        await km.shutdown_kernel()

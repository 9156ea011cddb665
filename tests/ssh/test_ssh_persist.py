"""SSH kernels outlive their server (issue 21), against a real sshd on 127.0.0.1.

A kernelspec with ``persist_kernels`` writes a ``persist`` file (its adoption grace) in
the kernel's remote directory. A stopping server detaches the kernel (its owner file gets
a detached mark, its tunnels and SSH link close, the kernel runs on) and a fresh
provisioner adopts it with its connection info and state. The orphan sweep keeps a
detached kernel for its grace and removes it after; it marks a persisted kernel of a
SIGKILLed server detached (then adoptable) and removes a non-persisted one as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.files import PORT_NAMES
from provisioners.connection.sshlink import SSHLink
from provisioners.lifecycle.owner import ServerIdentity, detached_since
from provisioners.ssh import SSHClusterProvisioner, sweep_orphans
from tests.helpers import (
    SSH_PROVISIONER,
    ServerProcess,
    async_wait_for,
    execute,
    write_kernelspec,
)
from tests.helpers.ssh import pid_alive
from tests.jupyter_server import persist_server, run_code

pytestmark = pytest.mark.ssh


def owner_of(kernel_dir: Path) -> str:
    return (kernel_dir / "owner").read_text().strip()


def server_pid(owner: str) -> int:
    """The pid of the server an owner file names."""
    identity = ServerIdentity.parse(owner)
    assert identity is not None, owner
    return identity.pid


async def adopt(record: dict[str, Any], kernel_spec: Any, config: dict[str, Any]) -> Any:
    """A fresh provisioner of another 'server' adopting ``record`` (from
    ``adoptable_kernels``), as the persist extension's adoption does."""
    fresh = SSHClusterProvisioner(kernel_id=record["kernel_id"], kernel_spec=kernel_spec, **config)
    await fresh.load_provisioner_info(record)
    assert await fresh.poll() is None
    return fresh


async def remove(provisioner: Any) -> None:
    """Shut an adopted kernel down (its provisioner has no manager)."""
    await provisioner.kill()
    await provisioner.cleanup()


async def test_detach_then_adopt_in_a_fresh_provisioner(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path
) -> None:
    config = dict(ssh_config, persist_kernels=True)
    km = kernel_manager(SSH_PROVISIONER, config)
    await km.start_kernel()
    engine = km.provisioner.engine
    pid, kernel_dir = engine.pid, Path(engine.kernel_dir)
    assert (kernel_dir / "persist").read_text().strip() == "900"  # the default grace
    assert (await execute(km, "x = 'kept across servers'"))["status"] == "ok"
    key = km.session.key

    started = time.monotonic()
    assert await km.provisioner.detach() is True
    detach_time = time.monotonic() - started
    assert detached_since(owner_of(kernel_dir)) is not None
    assert SSHLink.active() == []  # tunnels and the engine's link are closed
    await asyncio.sleep(1.0)  # sshd has ended the sessions: the kernel runs on
    assert pid_alive(pid) and await km.provisioner.poll() == 0  # no longer ours

    template = SSHClusterProvisioner(kernel_id="adopt", kernel_spec=km.kernel_spec, **config)
    (record,) = await template.adoptable_kernels()
    remote = json.loads((kernel_dir / "connection.json").read_text())
    assert record["kernel_id"] == km.kernel_id
    assert record["kernel_info"]["key"] == key.decode()
    assert record["ports"] == [remote[name] for name in PORT_NAMES]
    assert record["port_host"] == "ssh:127.0.0.1"
    assert record["state"] == engine.kernel_state()
    # a kernelspec of another name adopts nothing of it
    other = SSHClusterProvisioner(kernel_id="other", kernel_spec=None, **config)
    assert other.spec_name != km.kernel_name and await other.adoptable_kernels() == []

    fresh = await adopt(json.loads(json.dumps(record)), km.kernel_spec, config)
    try:
        assert owner_of(kernel_dir) == str(ServerIdentity.current())
        assert await template.adoptable_kernels() == []  # its owner runs: not adoptable
        assert fresh.connection_info["key"] == key
        out = await execute(dict(fresh.connection_info), "print(x)")
        assert out["stdout"] == "kept across servers\n"
        assert await template.sweep_orphans() == []
    finally:
        await remove(fresh)
    assert not pid_alive(pid) and list(remote_runtime.iterdir()) == []
    assert detach_time < 5.0, detach_time


async def test_sweep_keeps_a_detached_kernel_for_its_grace_then_removes_it(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path
) -> None:
    """A detached kernel is kept for its grace and removed after it; one whose process
    ended is removed at once (nothing is left to adopt)."""
    grace = 3.0
    config = dict(ssh_config, persist_kernels=True, adoption_grace=grace)
    km, ended = kernel_manager(SSH_PROVISIONER, config), kernel_manager(SSH_PROVISIONER, config)
    await asyncio.gather(km.start_kernel(), ended.start_kernel())
    pid, kernel_dir = km.provisioner.engine.pid, Path(km.provisioner.engine.kernel_dir)
    ended_pid, ended_dir = ended.provisioner.engine.pid, ended.provisioner.engine.kernel_dir
    assert (kernel_dir / "persist").read_text().strip() == "3"
    assert await km.provisioner.detach() is True and await ended.provisioner.detach() is True
    mark = owner_of(kernel_dir)
    since = detached_since(mark)
    assert since is not None
    os.kill(ended_pid, signal.SIGKILL)
    assert await async_wait_for(lambda: not pid_alive(ended_pid), timeout=10)

    # inside the grace: kept, by a kernelspec's sweep and by the module function (which
    # has no settings: it reads the grace recorded in the kernel's 'persist' file)
    maintenance = SSHClusterProvisioner(
        kernel_id="maintenance", kernel_spec=km.kernel_spec, **config
    )
    assert await maintenance.sweep_orphans() == [f"ssh kernel 127.0.0.1:{ended_dir}"]
    assert await asyncio.to_thread(sweep_orphans, **ssh_config) == []
    assert pid_alive(pid) and owner_of(kernel_dir) == mark  # the grace is not restarted
    assert [p.name for p in remote_runtime.iterdir()] == [kernel_dir.name]

    await asyncio.sleep(max(0.0, since + grace - time.time()) + 0.2)
    assert await asyncio.to_thread(sweep_orphans, **ssh_config) == [str(kernel_dir)]
    assert await async_wait_for(lambda: not pid_alive(pid), timeout=10)
    assert list(remote_runtime.iterdir()) == []
    # the detached managers (of a server that stopped) hold nothing more to remove; they
    # release the port records a stopped server's process would take with it
    for manager in (km, ended):
        await manager.shutdown_kernel(now=True)


async def test_a_killed_servers_persisted_kernel_is_marked_then_adopted(
    ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path
) -> None:
    """Two servers are SIGKILLed, one with a persisted kernel, one with a plain one. The
    sweep removes the plain kernel as before and marks the persisted one detached; a
    fresh provisioner then adopts it, and it answers with the keys it started with."""
    kernel_dir = tmp_path / "kernels"
    persisted_config = dict(ssh_config, persist_kernels=True, adoption_grace=120)
    ksm = write_kernelspec(kernel_dir, "persisted", SSH_PROVISIONER, persisted_config)
    write_kernelspec(kernel_dir, "plain", SSH_PROVISIONER, ssh_config)
    victims = [ServerProcess(kernel_dir, name, 1) for name in ("persisted", "plain")]
    for victim in victims:
        victim.wait_ready()
        victim.kill()
        victim.stop()
    (kept,), (plain,) = (victim.kernels for victim in victims)
    kept_pid, kept_dir = kept["info"]["state"]["pid"], Path(kept["info"]["state"]["kernel_dir"])
    plain_pid, plain_dir = plain["info"]["state"]["pid"], plain["info"]["state"]["kernel_dir"]
    # both kernels outlived their server and its SSH link
    assert pid_alive(kept_pid) and pid_alive(plain_pid)
    assert (kept_dir / "persist").exists() and not (Path(plain_dir) / "persist").exists()

    spec = ksm.get_kernel_spec("persisted")
    template = SSHClusterProvisioner(kernel_id="adopt", kernel_spec=spec, **persisted_config)
    # adoptable at once (its server is gone), before any sweep marked it
    assert [r["kernel_id"] for r in await template.adoptable_kernels()] == [kept["kernel_id"]]

    plain_spec = ksm.get_kernel_spec("plain")
    maintenance = SSHClusterProvisioner(
        kernel_id="maintenance", kernel_spec=plain_spec, **ssh_config
    )
    assert await maintenance.sweep_orphans() == [f"ssh kernel 127.0.0.1:{plain_dir}"]
    assert await async_wait_for(lambda: not pid_alive(plain_pid), timeout=10)
    assert not Path(plain_dir).exists()
    assert detached_since(owner_of(kept_dir)) is not None and pid_alive(kept_pid)
    assert await maintenance.sweep_orphans() == []  # inside its grace of 120 s

    (record,) = await template.adoptable_kernels()
    assert record["kernel_info"]["key"] == kept["info"]["kernel_info"]["key"]
    assert record["state"] == kept["info"]["state"]
    assert record["ports"] == kept["info"]["ports"]
    fresh = await adopt(record, spec, persisted_config)
    try:
        assert owner_of(kept_dir) == str(ServerIdentity.current())
        out = await execute(dict(fresh.connection_info), "import os; print(os.getpid())")
        assert int(out["stdout"]) == kept_pid
        assert await maintenance.sweep_orphans() == []
    finally:
        await remove(fresh)
    assert not pid_alive(kept_pid) and list(remote_runtime.iterdir()) == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_an_ssh_kernel_and_its_session_survive_a_jupyter_server_restart(
    ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    """A laptop's Jupyter Server with an SSH kernel is restarted (SIGTERM: it detaches the
    kernel; SIGKILL: it dies): the next server adopts the kernel under its id, with its
    session and its variables, before it answers a request."""
    first = persist_server(tmp_path)
    config = dict(ssh_config, persist_kernels=True)
    write_kernelspec(first.kernels, "kept", SSH_PROVISIONER, config)
    pid = 0
    try:
        with first:
            body = {"path": "work.ipynb", "type": "notebook", "kernel": {"name": "kept"}}
            status, model = first.request("POST", "api/sessions", body)
            assert status == 201, model
            kernel_id, session_id = model["kernel"]["id"], model["id"]
            out = await run_code(first, kernel_id, "kept_value = 'S-' + str(6 * 7)")
            assert out["status"] == "ok", out
            (kernel_dir,) = remote_runtime.iterdir()
            pid = int((kernel_dir / "pid").read_text().split()[0])
            first.stop(stop)
        assert pid_alive(pid)
        owner = owner_of(kernel_dir)
        if stop == signal.SIGTERM:
            assert "Detached 1 kernel" in first.log(), first.log()
            assert detached_since(owner) is not None
        else:  # the dead server's identity: adoptable as it is
            assert first.proc is not None and server_pid(owner) == first.proc.pid

        second = persist_server(tmp_path)
        with second:
            status, kernels = second.request("GET", "api/kernels")
            assert status == 200 and [k["id"] for k in kernels] == [kernel_id], second.log()
            status, sessions = second.request("GET", "api/sessions")
            assert [(s["id"], s["kernel"]["id"]) for s in sessions] == [(session_id, kernel_id)]
            assert second.proc is not None and server_pid(owner_of(kernel_dir)) == second.proc.pid
            out = await run_code(second, kernel_id, "print(kept_value)")
            assert out["stdout"] == "S-42\n", out
            status, _ = second.request("DELETE", f"api/kernels/{kernel_id}")
            assert status == 204
        assert not pid_alive(pid) and list(remote_runtime.iterdir()) == []
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

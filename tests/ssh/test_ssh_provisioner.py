"""The SSH target against a real sshd on 127.0.0.1: this machine is the 'remote' host,
with a runtime directory of its own, reached over ssh and through SSH tunnels."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.connection.ports import ClusterPortCache, port_is_listening
from provisioners.connection.sshlink import SSHLink
from provisioners.connection.tunnels import KERNEL_PORT_NAMES
from provisioners.exceptions import (
    EngineUnavailableError,
    ForwardingRefusedError,
    HostKeyError,
    KernelStartError,
    SSHAuthenticationError,
)
from provisioners.lifecycle.owner import ServerIdentity
from provisioners.ssh import SSHClusterProvisioner, sweep_orphans
from tests.helpers import (
    SSH_PROVISIONER,
    ServerProcess,
    async_wait_for,
    execute,
    start_sshd,
    write_kernelspec,
)
from tests.helpers.ssh import execute_info, pid_alive

pytestmark = pytest.mark.ssh


def kernel_pid(km: AsyncKernelManager) -> int:
    pid = km.provisioner.engine.pid
    assert pid is not None
    return pid


async def interrupt_busy_loop(km: AsyncKernelManager) -> dict[str, Any]:
    """Run ``while True: pass``, interrupt it, return the execute_reply content."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        msg_id = kc.execute("while True: pass")
        while True:  # the loop has started once its execute_input is published
            msg = await kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
                break
        await asyncio.sleep(0.3)
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=20)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]
    finally:
        kc.stop_channels()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_execute_interrupt_restart_shutdown(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path
) -> None:
    km = kernel_manager(SSH_PROVISIONER, ssh_config, interrupt_mode="signal")
    await km.start_kernel()
    provisioner = km.provisioner
    assert isinstance(provisioner, SSHClusterProvisioner) and not provisioner.engine.fallback_for
    pid = kernel_pid(km)
    kernel_dir = Path(provisioner.engine.kernel_dir)
    assert kernel_dir.parent == remote_runtime
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((kernel_dir / "connection.json").stat().st_mode) == 0o600
    assert (kernel_dir / "owner").read_text().strip() == str(ServerIdentity.current())
    assert (kernel_dir / "pid").read_text().split()[::2] == [str(pid), "1"]  # own group
    # the kernel binds 127.0.0.1 remotely; the client talks to the tunnel's local ports
    remote = json.loads((kernel_dir / "connection.json").read_text())
    info = km.get_connection_info()
    assert remote["ip"] == "127.0.0.1" and info["ip"] == "127.0.0.1"
    assert not {remote[n] for n in KERNEL_PORT_NAMES} & {info[n] for n in KERNEL_PORT_NAMES}
    # the kernel's ports are held on the remote host, the tunnel's on this one
    held = ClusterPortCache.instance().held()
    remote_held = held[f"ssh:{ssh_config['host']}"]
    assert set(remote_held) == {remote[n] for n in KERNEL_PORT_NAMES}
    assert {r["owner"] for r in remote_held.values()} == {f"kernel-{km.kernel_id}"}
    assert set(held["localhost"]) == {info[n] for n in KERNEL_PORT_NAMES}
    assert {r["owner"] for r in held["localhost"].values()} == {f"tunnel-{km.kernel_id}"}

    out = await execute(km, "import os; print(os.getpid())")
    assert int(out["stdout"]) == pid  # the detached remote process answers

    reply = await interrupt_busy_loop(km)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert (await execute(km, "print('still here')"))["stdout"] == "still here\n"

    # a client connected before the restart keeps working: the local ports are kept
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        await km.restart_kernel()
        new_pid = kernel_pid(km)
        assert new_pid != pid
        assert await async_wait_for(lambda: not pid_alive(pid))
        assert km.get_connection_info() == info
        await kc.wait_for_ready(timeout=30)  # its channels reconnected to the new kernel
        reply = await kc.execute_interactive("import os; os.getpid()", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    out = await execute(km, "import os; print(os.getpid())")
    assert int(out["stdout"]) == new_pid

    await km.shutdown_kernel()
    assert not pid_alive(new_pid)
    assert list(remote_runtime.iterdir()) == []
    assert not any(port_is_listening("127.0.0.1", info[n]) for n in KERNEL_PORT_NAMES)
    # no port records, tunnel threads or SSH links: checked by the autouse fixture


async def test_transport_closed_mid_session(
    kernel_manager: Any, ssh_config: dict[str, Any]
) -> None:
    km = kernel_manager(SSH_PROVISIONER, ssh_config)
    await km.start_kernel()
    pid = kernel_pid(km)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        assert (await kc.execute_interactive("x = 41", timeout=30))["content"]["status"] == "ok"
        (link,) = SSHLink.active()
        await asyncio.to_thread(link.disconnect)  # the paramiko transport is closed
        await asyncio.sleep(0.3)
        reply = await kc.execute_interactive("assert x == 41", timeout=30)
        assert reply["content"]["status"] == "ok"
        assert link.reconnects == 1
        assert kernel_pid(km) == pid and await km.is_alive()
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert not pid_alive(pid)


async def test_kernel_values_reach_the_kernel_literally(
    kernel_manager: Any,
    ssh_config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = tmp_path / "pwned"
    nasty = (
        f"$(touch {marker}) `touch {marker}` ; touch {marker} & 'quoted' \"double\" "
        "\\back\\slash\nsecond line $HOME ${PATH} %s {connection_file}"
    )
    monkeypatch.setenv("SERVER_SECRET_TOKEN", "s3cr3t")
    km = kernel_manager(SSH_PROVISIONER, ssh_config, env={"FROM_SPEC": "spec value"})
    await km.start_kernel(env={"KERNEL_NASTY": nasty, "KERNEL_EMPTY": ""})
    try:
        code = (
            "import os, json; print(json.dumps([os.environ.get(k) for k in "
            "('KERNEL_NASTY', 'KERNEL_EMPTY', 'FROM_SPEC', 'SERVER_SECRET_TOKEN')]))"
        )
        out = await execute(km, code)
        assert json.loads(out["stdout"]) == [nasty, "", "spec value", None]
        assert not marker.exists()
        kernel_dir = Path(km.provisioner.engine.kernel_dir)
        # the HMAC key is in the 0600 connection file only
        key = km.session.key.decode()
        pid = kernel_pid(km)
        assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert key not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert key not in (kernel_dir / "launch.sh").read_text()
        assert key not in (kernel_dir / "kernel.log").read_text()
    finally:
        await km.shutdown_kernel()
    assert not marker.exists()


async def test_unknown_host_key_refused_then_accepted_with_the_switch(
    kernel_manager: Any, ssh_config: dict[str, Any], tmp_path: Path, remote_runtime: Path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    strict = kernel_manager(SSH_PROVISIONER, dict(ssh_config, ssh_known_hosts=str(empty)))
    with pytest.raises(HostKeyError, match="not in"):
        await strict.start_kernel()
    assert not strict.has_kernel and not strict.provisioner.engine.fallback_for  # no fallback
    assert list(remote_runtime.iterdir()) == []

    accepting = kernel_manager(
        SSH_PROVISIONER,
        dict(ssh_config, ssh_known_hosts=str(empty), ssh_accept_unknown_host_keys=True),
    )
    await accepting.start_kernel()
    try:
        assert (await execute(accepting, "print('accepted')"))["stdout"] == "accepted\n"
    finally:
        await accepting.shutdown_kernel()
    assert empty.read_text() == ""


async def test_changed_host_key_refused(
    kernel_manager: Any, ssh_config: dict[str, Any], sshd: Any, tmp_path: Path, remote_runtime: Path
) -> None:
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    changed = tmp_path / "known_hosts"
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    changed.write_text(f"[{sshd.host}]:{sshd.port} {public}\n")
    config = dict(ssh_config, ssh_known_hosts=str(changed), ssh_accept_unknown_host_keys=True)
    km = kernel_manager(SSH_PROVISIONER, config)
    with pytest.raises(HostKeyError, match="CHANGED"):
        await km.start_kernel()
    assert not km.has_kernel and list(remote_runtime.iterdir()) == []


async def test_auth_failure_is_fast_and_never_falls_back(
    kernel_manager: Any, ssh_config: dict[str, Any], tmp_path: Path, remote_runtime: Path
) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    km = kernel_manager(SSH_PROVISIONER, dict(ssh_config, key_file=str(wrong)))
    started = time.monotonic()
    with pytest.raises(SSHAuthenticationError, match="authentication") as failed:
        await km.start_kernel()
    assert time.monotonic() - started < ssh_config["ssh_connect_timeout"]
    assert str(wrong) in str(failed.value)
    assert not km.has_kernel and not km.provisioner.engine.fallback_for
    assert list(remote_runtime.iterdir()) == []


async def test_missing_remote_interpreter_is_named(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path
) -> None:
    argv = ["/nonexistent/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km = kernel_manager(SSH_PROVISIONER, ssh_config, argv=argv)
    started = time.monotonic()
    with pytest.raises(KernelStartError, match="/nonexistent/bin/python3"):
        await km.start_kernel()
    assert time.monotonic() - started < ssh_config["ssh_connect_timeout"]
    assert not km.has_kernel and list(remote_runtime.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ([sys.executable, "-m", "no_such_kernel_module", "-f", "{connection_file}"], "No module"),
        (
            [sys.executable, "-c", "raise SystemExit('no kernel here')", "{connection_file}"],
            "no kernel here",
        ),
        (
            [
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "--no-such-flag",
                "-f",
                "{connection_file}",
            ],
            "no-such-flag",
        ),
    ],
    ids=["missing-module", "wrong-program", "bad-argv"],
)
async def test_a_kernel_dying_at_start_fails_the_start_with_its_log(
    kernel_manager: Any,
    ssh_config: dict[str, Any],
    remote_runtime: Path,
    argv: list[str],
    said: str,
) -> None:
    """The start itself fails, within seconds, with the end of the remote kernel log; the
    kernel's directory, its ports and the SSH link are gone (checked after each test)."""
    km = kernel_manager(SSH_PROVISIONER, ssh_config, argv=argv)
    started = time.monotonic()
    with pytest.raises(KernelStartError, match="exited") as failure:
        await km.start_kernel()
    assert time.monotonic() - started < 15
    assert said in str(failure.value) and "last lines of its log" in str(failure.value)
    assert str(failure.value).splitlines()[0] == "The kernel exited while starting."
    assert list(remote_runtime.iterdir()) == []


async def test_an_sshd_refusing_forwarding_fails_the_start_by_name(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path
) -> None:
    """'AllowTcpForwarding no': the start probes the heartbeat through the SSH server and
    fails naming the cause, instead of succeeding with tunnels that never connect."""
    refusing = start_sshd(
        tmp_path / "no-forwarding", extra_config=["Match all", "    AllowTcpForwarding no"]
    )
    try:
        config = dict(
            ssh_config,
            port=refusing.port,
            key_file=str(refusing.user_key_path),
            ssh_known_hosts=str(refusing.known_hosts_path),
        )
        km = kernel_manager(SSH_PROVISIONER, config)
        started = time.monotonic()
        with pytest.raises(ForwardingRefusedError, match="AllowTcpForwarding"):
            await km.start_kernel()
        assert time.monotonic() - started < 15
        assert not km.has_kernel and list(remote_runtime.iterdir()) == []
    finally:
        refusing.stop()


async def test_unreachable_host_falls_back_to_a_local_kernel(
    kernel_manager: Any, ssh_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    km = kernel_manager(SSH_PROVISIONER, dict(ssh_config, port=port))
    await km.start_kernel()
    try:
        assert km.provisioner.engine.target == "local"
        assert (await execute(km, "print('local')"))["stdout"] == "local\n"
        assert SSHLink.active() == []  # the local kernel is not tunnelled
    finally:
        await km.shutdown_kernel()
    assert "unreachable" in caplog.text and str(port) in caplog.text

    strict = kernel_manager(SSH_PROVISIONER, dict(ssh_config, port=port, fallback="none"))
    with pytest.raises(EngineUnavailableError, match=str(port)):
        await strict.start_kernel()


async def test_provisioner_info_reattaches(kernel_manager: Any, ssh_config: dict[str, Any]) -> None:
    km = kernel_manager(SSH_PROVISIONER, ssh_config)
    await km.start_kernel()
    try:
        assert (await execute(km, "print('first')"))["stdout"] == "first\n"
        info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
        assert info["target"] == "ssh" and info["state"]["pid"] == kernel_pid(km)
        fresh = SSHClusterProvisioner(
            kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, **ssh_config
        )
        await fresh.load_provisioner_info(info)
        try:
            assert await fresh.poll() is None
            # a parentless client: a bare KernelManager would call the kernel dead
            out = await execute_info(dict(fresh.connection_info), "print('again')")
            assert out["stdout"] == "again\n"
        finally:  # detach without stopping the kernel
            assert fresh.engine.tunnels is not None
            await fresh.engine.tunnels.close()
            await fresh.engine.start_given_up()  # releases its SSH link
        assert await km.is_alive()
    finally:
        await km.shutdown_kernel()


async def test_sweep_orphans_removes_only_dead_owners(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path
) -> None:
    """A kernel whose owner (server process) is gone is killed and its files removed, by
    the module function and by ``jupyter-provisioners cleanup``; a live owner's is kept."""
    orphaned = kernel_manager(SSH_PROVISIONER, ssh_config, name="orphans")
    await orphaned.start_kernel()
    pid = kernel_pid(orphaned)
    orphan = Path(orphaned.provisioner.engine.kernel_dir)
    maintenance = SSHClusterProvisioner(
        kernel_id="maintenance", kernel_spec=orphaned.kernel_spec, **ssh_config
    )
    (row,) = await maintenance.list_kernels()
    assert row["kernel_id"] == orphaned.kernel_id and row["where"] == f"127.0.0.1 pid {pid}"
    assert row["state"] == "running" and row["owner"] == str(ServerIdentity.current())

    dead = subprocess.Popen(["true"])
    dead.wait()
    (orphan / "owner").write_text(f"{socket.gethostname()}.{dead.pid}.0\n")  # it "crashed"
    live = remote_runtime / "cluster-kernel-live"
    live.mkdir(mode=0o700)
    (live / "owner").write_text(f"{ServerIdentity.current()}\n")
    try:
        assert await asyncio.to_thread(sweep_orphans, dry_run=True, **ssh_config) == [str(orphan)]
        assert orphan.exists() and pid_alive(pid)
        kernel_dir = str(tmp_path / "kernels")
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "provisioners", "cleanup", "--kernel-dir", kernel_dir],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert f"ssh kernel 127.0.0.1:{orphan}" in cli.stdout
        assert not pid_alive(pid) and not orphan.exists() and live.exists()
        assert await asyncio.to_thread(sweep_orphans, **ssh_config) == []
    finally:
        subprocess.run(["rm", "-rf", str(live)], check=True)
    await orphaned.shutdown_kernel(now=True)  # nothing left to remove: no error
    assert list(remote_runtime.iterdir()) == []


async def test_a_first_start_sweeps_dead_servers_kernels_but_keeps_reattached_ones(
    kernel_manager: Any, ssh_config: dict[str, Any], remote_runtime: Path, tmp_path: Path
) -> None:
    """A server with two SSH kernels is SIGKILLed. This process reattaches one of them
    (it becomes that kernel's owner), then starts a kernel of its own on the host: that
    first start sweeps the other, orphaned kernel and keeps the reattached one."""
    kernel_dir = tmp_path / "kernels"
    write_kernelspec(kernel_dir, "victim", SSH_PROVISIONER, ssh_config)
    victim = ServerProcess(kernel_dir, "victim", 2).wait_ready()
    victim.kill()
    victim.stop()
    kept, orphan = victim.kernels
    orphan_pid, orphan_dir = orphan["info"]["state"]["pid"], orphan["info"]["state"]["kernel_dir"]
    assert pid_alive(orphan_pid) and Path(orphan_dir).exists()

    reattached = SSHClusterProvisioner(kernel_id=kept["kernel_id"], kernel_spec=None, **ssh_config)
    await reattached.load_provisioner_info(kept["info"])
    km = kernel_manager(SSH_PROVISIONER, ssh_config)
    await km.start_kernel()
    try:
        assert await async_wait_for(lambda: not pid_alive(orphan_pid), timeout=10)
        assert not Path(orphan_dir).exists()
        assert sorted(p.name for p in remote_runtime.iterdir()) == sorted(
            Path(d).name for d in (reattached.engine.kernel_dir, km.provisioner.engine.kernel_dir)
        )
        out = await execute_info(dict(reattached.connection_info), "print('kept')")
        assert out["stdout"] == "kept\n"
        assert (await execute(km, "print('new')"))["stdout"] == "new\n"
    finally:
        await km.shutdown_kernel()
        await reattached.kill()
        await reattached.cleanup()
    assert list(remote_runtime.iterdir()) == []

"""provisioners.connection.tunnels against a real sshd on 127.0.0.1: the seed's tunnel functions,
host-key checks, authentication errors, reconnects and ``ssh_server`` on a provisioner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from provisioners import EngineUnavailableError, forward_tunnel, ssh_tunnel, tunnel_to_kernel
from provisioners.connection.ports import port_is_listening
from provisioners.connection.sshlink import ENV_ACCEPT_UNKNOWN, SSHLink, SSHSettings
from provisioners.connection.tunnels import KERNEL_PORT_NAMES, KernelTunnels
from provisioners.exceptions import HostKeyError, SSHAuthenticationError, SSHUnreachableError
from tests.helpers import LOCAL_PROVISIONER, async_wait_for, start_sshd
from tests.helpers.ssh import execute_info

pytestmark = pytest.mark.ssh


@pytest.fixture
async def local_km() -> AsyncIterator[AsyncKernelManager]:
    """A kernel of this machine started by jupyter_client itself: the 'remote' kernel."""
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    yield km
    await km.shutdown_kernel(now=True)


def through(info: dict[str, Any], ports: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """``info`` with the five ports replaced by tunnel ports on 127.0.0.1."""
    tunnelled = dict(info)
    tunnelled.update(zip(KERNEL_PORT_NAMES, ports, strict=True))
    tunnelled["ip"] = "127.0.0.1"
    return tunnelled


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def other_host_key(tmp_path: Path) -> str:
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


async def test_tunnel_to_kernel_drives_all_five_channels(
    local_km: AsyncKernelManager, sshd: Any, server: str
) -> None:
    info = local_km.get_connection_info()
    # a connection file path, as jupyter_client accepts
    ports = await asyncio.to_thread(
        tunnel_to_kernel, local_km.connection_file, server, str(sshd.user_key_path)
    )
    try:
        assert isinstance(ports, tuple) and len(set(ports)) == 5
        assert not set(ports) & {info[name] for name in KERNEL_PORT_NAMES}
        out = await execute_info(through(info, ports), "print(6 * 7, input())")
        assert out == {"stdout": "42 through stdin\n", "error": None, "status": "ok"}
        # the client closed its channels: every relay ends
        assert await async_wait_for(lambda: ports.server.active_connections == 0)
    finally:
        await asyncio.to_thread(ports.close)
    assert not any(port_is_listening("127.0.0.1", port) for port in ports)


async def test_forward_tunnel_and_ssh_tunnel(
    local_km: AsyncKernelManager, sshd: Any, server: str
) -> None:
    info = local_km.get_connection_info()
    key = str(sshd.user_key_path)
    forwards = [
        await asyncio.to_thread(forward_tunnel, 0, info[name], "127.0.0.1", server, key)
        for name in KERNEL_PORT_NAMES[:3]
    ]
    fixed = [free_port(), free_port()]
    handles = [
        await asyncio.to_thread(ssh_tunnel, lport, info[name], server, "127.0.0.1", key)
        for lport, name in zip(fixed, KERNEL_PORT_NAMES[3:], strict=True)
    ]
    try:
        ports = [f.server_address[1] for f in forwards] + [h.local_port for h in handles]
        assert ports[3:] == fixed
        assert all(h.poll() is None for h in handles)
        out = await execute_info(through(info, ports), "print(input())")
        assert out["stdout"] == "through stdin\n"
    finally:
        for handle in handles:
            handle.terminate()
        for forward in forwards:
            forward.shutdown()
    assert [h.wait(timeout=5) for h in handles] == [-15, -15]


async def test_unknown_host_key_is_refused_unless_accepted(
    sshd: Any, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    tunnels = KernelTunnels(server, key_file=str(sshd.user_key_path), known_hosts=str(empty))
    with pytest.raises(HostKeyError) as refused:
        await tunnels.open("127.0.0.1", {"shell_port": 1})
    message = str(refused.value)
    assert str(empty) in message and "SHA256:" in message and "accept_unknown_host_keys" in message
    assert not tunnels.is_open and SSHLink.active() == []

    accepting = KernelTunnels(
        server,
        key_file=str(sshd.user_key_path),
        known_hosts=str(empty),
        accept_unknown_host_keys=True,
    )
    async with accepting:
        ports = await accepting.open("127.0.0.1", {"shell_port": sshd.port})
        assert port_is_listening("127.0.0.1", ports["shell_port"])
    assert empty.read_text() == ""  # never written

    # the module-level knob of the seed functions
    monkeypatch.setenv("CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS", str(empty))
    with pytest.raises(HostKeyError):
        await asyncio.to_thread(
            ssh_tunnel, 0, sshd.port, server, "127.0.0.1", str(sshd.user_key_path)
        )
    monkeypatch.setenv(ENV_ACCEPT_UNKNOWN, "1")
    handle = await asyncio.to_thread(
        ssh_tunnel, 0, sshd.port, server, "127.0.0.1", str(sshd.user_key_path)
    )
    handle.kill()
    assert handle.wait(5) == -9


async def test_changed_host_key_is_always_refused(sshd: Any, server: str, tmp_path: Path) -> None:
    changed = tmp_path / "known_hosts"
    changed.write_text(f"[{sshd.host}]:{sshd.port} {other_host_key(tmp_path)}\n")
    for accept in (False, True):
        tunnels = KernelTunnels(
            server,
            key_file=str(sshd.user_key_path),
            known_hosts=str(changed),
            accept_unknown_host_keys=accept,
        )
        with pytest.raises(HostKeyError, match="CHANGED"):
            await tunnels.open("127.0.0.1", {"shell_port": 1})


async def test_authentication_failure_is_fast_and_clear(
    sshd: Any, server: str, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    cases = {
        "wrong key": {"key_file": str(wrong)},
        "missing key": {"key_file": str(tmp_path / "nope")},
        "password": {"password": "not-the-password"},
    }
    for what, kwargs in cases.items():
        started = time.monotonic()
        tunnels = KernelTunnels(server, connect_timeout=5, **kwargs)
        with pytest.raises(SSHAuthenticationError) as failed:
            await tunnels.open("127.0.0.1", {"shell_port": 1})
        assert time.monotonic() - started < 3, what
        assert sshd.user in str(failed.value) and "127.0.0.1" in str(failed.value), what
        assert not isinstance(failed.value, EngineUnavailableError)
    assert SSHLink.active() == []


async def test_agent_authentication(
    sshd: Any, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key file, no password: the key comes from an SSH agent, without a prompt."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        assert await async_wait_for(sock.exists)
        env = {"SSH_AUTH_SOCK": str(sock), "PATH": "/usr/bin:/bin"}
        subprocess.run(["ssh-add", "-q", str(sshd.user_key_path)], env=env, check=True, timeout=10)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        async with KernelTunnels(server) as tunnels:
            ports = await tunnels.open("127.0.0.1", {"shell_port": sshd.port})
            assert port_is_listening("127.0.0.1", ports["shell_port"])
    finally:
        agent.terminate()
        agent.wait(timeout=10)


async def test_unreachable_server_is_an_engine_error(known_hosts: Path) -> None:
    started = time.monotonic()
    tunnels = KernelTunnels(f"root@127.0.0.1:{free_port()}", connect_timeout=3)
    with pytest.raises(SSHUnreachableError) as failed:
        await tunnels.open("127.0.0.1", {"shell_port": 1})
    assert isinstance(failed.value, EngineUnavailableError)
    assert time.monotonic() - started < 3


async def test_sshd_restart_mid_session_reconnects(
    local_km: AsyncKernelManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd dies and comes back: the same client's next execute_request succeeds."""
    workdir = tmp_path / "own-sshd"
    first = start_sshd(workdir)
    monkeypatch.setenv("CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS", str(first.known_hosts_path))
    server = f"{first.user}@{first.host}:{first.port}"
    second = None
    info = local_km.get_connection_info()
    ports = await asyncio.to_thread(tunnel_to_kernel, info, server, str(first.user_key_path))
    kc = AsyncKernelClient()  # fresh: load_connection_info only fills unset ports
    kc.load_connection_info(through(info, ports))
    # No kernel manager: liveness is the heartbeat, dead after 1 s by default, which a
    # loaded machine misses through a tunnel (execute_info in conftest does the same).
    kc.hb_channel.time_to_dead = 10.0
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        assert (await kc.execute_interactive("x = 1", timeout=30))["content"]["status"] == "ok"
        await asyncio.to_thread(first.stop)
        second = await asyncio.to_thread(start_sshd, workdir, port=first.port)
        await asyncio.sleep(0.5)
        reply = await kc.execute_interactive("x += 1", timeout=30)
        assert reply["content"]["status"] == "ok"
        reply = await kc.execute_interactive("assert x == 2", timeout=30)
        assert reply["content"]["status"] == "ok"  # the same kernel, its state kept
        assert ports.server.link.reconnects >= 1
    finally:
        kc.stop_channels()
        await asyncio.to_thread(ports.close)
        if second is not None:
            second.stop()
        first.stop()


async def test_local_provisioner_routes_through_ssh_server(
    kernel_manager: Any, sshd: Any, server: str, jupyter_dirs: Path
) -> None:
    """``ssh_server`` works on any provisioner: here the local one, via the sshd."""
    km = kernel_manager(
        LOCAL_PROVISIONER,
        {
            "ssh_server": server,
            "ssh_key": str(sshd.user_key_path),
            "ssh_known_hosts": str(sshd.known_hosts_path),
        },
    )
    await km.start_kernel()
    provisioner = km.provisioner
    kernel_file = Path(provisioner.engine.kernel_connection_file())
    kernel_ports = json.loads(kernel_file.read_text())
    client_ports = km.get_connection_info()
    assert kernel_file != Path(km.connection_file)
    assert not {kernel_ports[n] for n in KERNEL_PORT_NAMES} & {
        client_ports[n] for n in KERNEL_PORT_NAMES
    }
    assert provisioner.engine.tunnels.ports == {n: client_ports[n] for n in KERNEL_PORT_NAMES}
    out = await execute_info(client_ports, "print('via sshd', input())")
    assert out["stdout"] == "via sshd through stdin\n"
    (link,) = SSHLink.active()
    assert link.settings.port == sshd.port
    await km.shutdown_kernel()
    assert not kernel_file.exists()


async def test_remote_scripts_with_and_without_a_kept_shell(tmp_path: Path) -> None:
    """SSHLink.sh: output, status and quoting through the kept shell, and the fallback to
    one session per script where the server ends every shell at once (a forced command
    reading no input)."""
    script = "printf '%s\\n' \"$1\" 'it'\"'\"'s' >&2; echo out; exit 3"
    for name, extra in (
        ("kept", []),
        ("forced", ['ForceCommand /bin/sh -c "$SSH_ORIGINAL_COMMAND" </dev/null']),
    ):
        server = start_sshd(tmp_path / name, extra_config=extra)
        try:
            settings = SSHSettings(
                host=server.host,
                port=server.port,
                user=server.user,
                key_file=str(server.user_key_path),
                known_hosts=str(server.known_hosts_path),
            )
            link = await asyncio.to_thread(SSHLink.acquire, settings)
            try:
                for _ in range(2):
                    result = await asyncio.to_thread(link.sh, script, timeout=10)
                    assert (result.returncode, result.stdout) == (3, "out\n"), name
                    assert result.stderr == "\nit's\n", name
                assert link._shell.unsupported == (name == "forced")
            finally:
                await asyncio.to_thread(link.release)
        finally:
            server.stop()


def _chatty_server() -> tuple[socket.socket, Any]:
    """A listener on 127.0.0.1 whose every connection gets data without pause until the
    peer goes away; ``(listener, stop)``."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def talk(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while not done.is_set():
                conn.sendall(b"x" * 512)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while not done.is_set():
                conn, _ = listener.accept()
                threading.Thread(target=talk, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def stop() -> None:
        done.set()
        listener.close()

    return listener, stop


async def test_connections_closing_while_data_arrives_keep_the_ssh_link(
    sshd: Any, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay that closes its channel while the transport feeds it data must not take
    the shared SSH connection down with it. paramiko closes a channel's readiness pipe
    (what the relay selects on) in the closing thread while its transport thread may be
    signalling that pipe: the write then fails with EBADF in the transport thread, which
    drops the connection and every other kernel channel on it, losing their requests in
    flight (a Jupyter Server's nudge closing its transient channels did it)."""
    listener, stop = _chatty_server()
    port = listener.getsockname()[1]
    forward = await asyncio.to_thread(
        forward_tunnel, 0, port, "127.0.0.1", server, str(sshd.user_key_path)
    )
    local = forward.server_address[1]

    def churn(rounds: int) -> int:
        received = 0
        for _ in range(rounds):
            with socket.create_connection(("127.0.0.1", local), timeout=10) as conn:
                received += len(conn.recv(4096))
        return received

    try:
        received = await asyncio.gather(*(asyncio.to_thread(churn, 60) for _ in range(4)))
        assert all(received), received
        await asyncio.sleep(0.5)  # relays finish closing
        assert forward.link.connected and forward.link.reconnects == 0, caplog.text
        assert "Socket exception" not in caplog.text
    finally:
        await asyncio.to_thread(forward.shutdown)
        stop()

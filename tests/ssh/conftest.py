"""Fixtures of the SSH suite: a real sshd on 127.0.0.1, kernels behind it, leak checks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import zmq
from jupyter_client.asynchronous import AsyncKernelClient

from provisioners.connection import sshconnect
from provisioners.connection.ports import ClusterPortCache
from provisioners.connection.sshlink import ENV_KNOWN_HOSTS, THREAD_PREFIX, SSHLink
from tests.helpers import skip_or_fail

try:
    from tests.engines.sshd import LoopbackSSHD, SSHDError
except ImportError:  # pragma: no cover - the helper ships with the test suite
    LoopbackSSHD = None  # type: ignore[assignment,misc]
    SSHDError = RuntimeError  # type: ignore[assignment,misc]

SSH_PROVISIONER = "cluster-ssh-provisioner"
LOCAL_PROVISIONER = "cluster-local-provisioner"


def start_sshd(workdir: Path, **kwargs: Any) -> Any:
    """A running LoopbackSSHD in ``workdir``, or skip/fail (CI) when sshd is unavailable."""
    if LoopbackSSHD is None:
        skip_or_fail("ssh", "tests/engines/sshd.py is missing")
    try:
        return LoopbackSSHD(workdir, **kwargs)
    except (SSHDError, OSError) as exc:
        skip_or_fail("ssh", f"cannot start sshd: {exc}")
        raise


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One sshd per test module (the tests never change its configuration)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def known_hosts(sshd: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sshd's known_hosts, also set as the default of provisioners.connection.sshlink."""
    monkeypatch.setenv(ENV_KNOWN_HOSTS, str(sshd.known_hosts_path))
    return Path(sshd.known_hosts_path)


@pytest.fixture
def server(sshd: Any, known_hosts: Path) -> str:
    """``user@127.0.0.1:port`` of the sshd."""
    return f"{sshd.user}@{sshd.host}:{sshd.port}"


@pytest.fixture
def remote_runtime(tmp_path: Path) -> Path:
    """The 'remote' host's runtime directory (the same machine, reached over ssh)."""
    path = tmp_path / "remote-runtime"
    path.mkdir()
    return path


@pytest.fixture
def ssh_config(sshd: Any, remote_runtime: Path) -> dict[str, Any]:
    """Kernelspec config of the SSH provisioner for the sshd."""
    return sshd.kernel_config(remote_runtime, ssh_connect_timeout=5.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """:func:`wait_until` for coroutines."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def tunnel_threads() -> list[threading.Thread]:
    """Our acceptor/relay threads and paramiko transport threads still alive."""
    return [
        t
        for t in threading.enumerate()
        if t.is_alive() and (t.name.startswith(THREAD_PREFIX) or isinstance(t, paramiko.Transport))
    ]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test (and its fixtures): no SSH link, no tunnel thread, no port record.

    Also: no SSH agent (tests use only the credentials they configure), and host keys
    accepted by one test are forgotten before the next.
    """
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield
    with sshconnect._ACCEPTED_LOCK:
        sshconnect._ACCEPTED_KEYS.clear()
    assert wait_until(lambda: not tunnel_threads()), tunnel_threads()
    assert SSHLink.active() == []
    assert ClusterPortCache.instance().held() in ({}, {"localhost": {}})


async def execute_info(info: dict[str, Any], code: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``code`` through a client of ``info`` and use all five channels on the way:
    kernel_info over control, a ping on the heartbeat, ``input()`` answered over stdin."""
    kc = AsyncKernelClient()
    kc.load_connection_info(info)
    # Without a kernel manager the client judges liveness by the heartbeat, whose first
    # verdict comes after time_to_dead: leave a kernel still starting up time to bind.
    kc.hb_channel.time_to_dead = 10.0
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        request = kc.session.msg("kernel_info_request")
        kc.control_channel.send(request)
        reply = await kc.control_channel.get_msg(timeout=timeout)
        assert reply["parent_header"]["msg_id"] == request["header"]["msg_id"]
        assert reply["msg_type"] == "kernel_info_reply"
        heartbeat = kc.context.socket(zmq.REQ)
        heartbeat.linger = 0
        try:
            heartbeat.connect(f"tcp://{info['ip']}:{info['hb_port']}")
            await heartbeat.send(b"ping")
            assert await asyncio.wait_for(heartbeat.recv(), timeout) == b"ping"
        finally:
            heartbeat.close()
        out: dict[str, Any] = {"stdout": "", "error": None}

        def on_output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out["stdout"] += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                out["error"] = msg["content"]["ename"]

        def on_input(msg: dict[str, Any]) -> None:
            kc.input("through stdin")

        reply = await kc.execute_interactive(
            code, timeout=timeout, output_hook=on_output, stdin_hook=on_input, allow_stdin=True
        )
        out["status"] = reply["content"]["status"]
        return out
    finally:
        kc.stop_channels()

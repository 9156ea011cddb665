"""A restart keeps the kernel's ports, and moves only one that is taken (with a WARNING).

Real local kernels; the port cache is the real one in the test's runtime dir.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.connection.files import PORT_NAMES
from provisioners.connection.ports import LOCAL_HOST, ClusterPortCache
from provisioners.lifecycle.newports import can_bind
from provisioners.ssh.remote import _parse_ports
from tests.helpers import execute, restart_watching_ports, take_ports_after_cleanup

LOCAL = "cluster-local-provisioner"


def _ports(km: AsyncKernelManager) -> list[int]:
    return [int(km.get_connection_info()[name]) for name in PORT_NAMES]


def _records(km: AsyncKernelManager) -> set[int]:
    """The ports the cache holds for this kernel."""
    owner = f"kernel-{km.kernel_id}"
    held = ClusterPortCache.instance().held(LOCAL_HOST).get(LOCAL_HOST, {})
    return {port for port, record in held.items() if record.get("owner") == owner}


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("newports", [False, True])
async def test_restart_keeps_the_ports_and_the_cache_records(
    kernel_manager: Any, caplog: pytest.LogCaptureFixture, newports: bool
) -> None:
    """Kept through a restart, with or without newports (the kernel's connections left
    in TIME_WAIT by its death do not count as taken); the manager never shows 0."""
    caplog.set_level(logging.DEBUG)
    km = kernel_manager(LOCAL, {"port_range": "26000-26999"})
    await km.start_kernel()
    before = _ports(km)
    assert _records(km) == set(before)
    assert (await execute(km, "print('before')"))["stdout"] == "before\n"
    for _ in range(2):
        seen = await restart_watching_ports(km, now=True, newports=newports)
        assert _ports(km) == before
        assert 0 not in seen and seen == set(before)
        assert _records(km) == set(before)
        out = await execute(km, "print('kept')", timeout=30)
        assert out["stdout"] == "kept\n"
    assert "taken at restart" not in caplog.text
    await km.shutdown_kernel()
    assert _records(km) == set()


@pytest.mark.parametrize("newports", [False, True])
async def test_a_taken_port_moves_and_says_so(
    kernel_manager: Any, caplog: pytest.LogCaptureFixture, newports: bool
) -> None:
    caplog.set_level(logging.WARNING)
    km = kernel_manager(LOCAL, {"port_range": "26000-26999"})
    await km.start_kernel()
    before = _ports(km)
    taken = before[PORT_NAMES.index("iopub_port")]
    held = take_ports_after_cleanup(km, [taken])
    try:
        seen = await restart_watching_ports(km, now=True, newports=newports)
        assert held, "the port was taken before the restart's start"
        after = _ports(km)
        kept = [a == b for a, b in zip(before, after, strict=True)]
        assert kept == [name != "iopub_port" for name in PORT_NAMES]
        moved_to = after[PORT_NAMES.index("iopub_port")]
        assert 26000 <= moved_to <= 26999 and moved_to not in before
        assert 0 not in seen
        assert _records(km) == set(after)  # the new port recorded, the taken one let go
        moved = [r for r in caplog.records if "taken at restart" in r.getMessage()]
        assert len(moved) == 1 and moved[0].levelno == logging.WARNING, caplog.text
        assert km.kernel_id in moved[0].getMessage()
        assert f"{taken} on localhost" in moved[0].getMessage()
        assert str(moved_to) in moved[0].getMessage()
        out = await execute(km, "print('moved')", timeout=30)
        assert out["stdout"] == "moved\n"
    finally:
        for sock in held:
            sock.close()
    await km.shutdown_kernel()
    assert _records(km) == set()


def test_a_dead_listeners_time_wait_connections_do_not_count() -> None:
    """A kernel that died closed its connections first: they linger in TIME_WAIT on its
    ports. A kernel binds with SO_REUSEADDR, so they do not keep it from its ports; a
    listener does."""
    server = _listen(0)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert not can_bind(port)  # listening
    server.close()
    accepted.close()  # the "kernel" side closes first: TIME_WAIT on its port
    client.recv(1)
    client.close()
    plain = socket.socket()
    with pytest.raises(OSError):  # without SO_REUSEADDR the port looks taken
        plain.bind(("127.0.0.1", port))
    plain.close()
    assert can_bind(port)
    # what an SSH host's sockets say (read as the SSH target reads them): the port is in
    # use, but nothing listens on it
    other = _listen(0)
    tcp = Path("/proc/net/tcp").read_text()
    assert {port, other.getsockname()[1]} <= _parse_ports(tcp)
    listening = _parse_ports(tcp, listening_only=True)
    assert port not in listening and other.getsockname()[1] in listening
    other.close()
    ss = f"TIME-WAIT 0 0 127.0.0.1:{port} 127.0.0.1:40000\nLISTEN 0 128 0.0.0.0:22 0.0.0.0:*\n"
    assert _parse_ports(ss) == {port, 22} and _parse_ports(ss, listening_only=True) == {22}

"""Concurrent kernel starts on one daemon, and port bookkeeping shared between servers."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from provisioners.connection.files import PORT_NAMES
from provisioners.connection.ports import ClusterPortCache, FilePortStore
from provisioners.docker import DockerPortSource
from provisioners.exceptions import PortsExhaustedError
from tests.helpers import execute

pytestmark = pytest.mark.docker


async def test_ten_concurrent_kernels(docker_kernels, tmp_path: Path) -> None:
    make, tracker = docker_kernels
    # half run as root, half as jovyan (uid 1000): each must read its connection file
    kms = [make({"user": "jovyan"} if i % 2 else {}) for i in range(10)]
    results = await asyncio.gather(*(km.start_kernel() for km in kms), return_exceptions=True)
    assert [r for r in results if r is not None] == []
    outs = await asyncio.gather(*(execute(km, "import os; print(os.getuid())") for km in kms))
    assert [o["stdout"] for o in outs] == ["0\n", "1000\n"] * 5

    ports = [km.get_connection_info()[n] for km in kms for n in PORT_NAMES]
    assert len(set(ports)) == 50, "a port was handed out twice"

    # Another server with its own (empty) store sharing the daemon: the Docker source
    # shows it every port our containers hold, so none of them is handed out again.
    other = ClusterPortCache(FilePortStore(tmp_path / "other-server"))
    source = DockerPortSource(tracker.client)
    assert set(ports) <= source.ports_in_use("localhost")

    def try_each_port() -> list[int]:
        handed_out = []
        for port in ports:
            with contextlib.suppress(PortsExhaustedError):
                handed_out += other.allocate(
                    1,
                    "other",
                    port_range=f"{port}-{port}",
                    sources=[source],
                    check_local_bind=False,
                )
        return handed_out

    assert await asyncio.to_thread(try_each_port) == []
    # without the source the empty store would have handed the port out
    assert other.allocate(1, "other", port_range=f"{ports[0]}-{ports[0]}", check_local_bind=False)
    other.release("other")

    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms))
    assert tracker.containers() == []
    assert ClusterPortCache.instance().held() == {}

"""The relay core (provisioners.connection.relay): local listeners on ports of the port
cache that relay TCP to a target which can change, as the Kubernetes pod-IP mode uses
them across restarts. Real sockets on 127.0.0.1, no engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from provisioners.connection.ports import ClusterPortCache, port_is_listening
from provisioners.connection.relay import TcpRelay
from provisioners.executor import EngineExecutor

EXECUTOR = EngineExecutor("relay-test", max_workers=2)


async def echo_server(tag: bytes) -> asyncio.Server:
    """Answers each line with ``tag`` and the line."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(tag + line)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    writer.write(text + b"\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[asyncio.Server, asyncio.Server]]:
    first, second = await echo_server(b"a:"), await echo_server(b"b:")
    yield first, second
    for server in (first, second):
        server.close()


async def test_retarget_keeps_the_local_port_and_ends_old_connections(
    servers: tuple[asyncio.Server, asyncio.Server],
) -> None:
    first, second = servers
    relay = TcpRelay(2, executor=EXECUTOR, what="a test relay")
    (port, _) = await relay.start()
    try:
        relay.retarget("127.0.0.1", [port_of(first), port_of(first)])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(reader, writer, b"x") == b"a:x\n"

        relay.retarget("127.0.0.1", [port_of(second), port_of(second)])
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the old connection ended
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(reader, writer, b"y") == b"b:y\n"

        relay.retarget("127.0.0.1", [port_of(second), port_of(second)])  # same: kept
        assert await ask(reader, writer, b"z") == b"b:z\n"
        writer.close()
    finally:
        await relay.stop()


async def test_a_paused_relay_holds_new_connections_until_retargeted(
    servers: tuple[asyncio.Server, asyncio.Server],
) -> None:
    first, second = servers
    relay = TcpRelay(1, executor=EXECUTOR, what="a test relay")
    (port,) = await relay.start()
    try:
        relay.retarget("127.0.0.1", [port_of(first)])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await ask(reader, writer, b"x") == b"a:x\n"
        relay.pause()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"held\n")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):  # accepted, but relayed nowhere yet
            await asyncio.wait_for(reader.readline(), 0.5)
        relay.retarget("127.0.0.1", [port_of(second)])
        assert await asyncio.wait_for(reader.readline(), 5) == b"b:held\n"
        writer.close()
    finally:
        await relay.stop()


async def test_a_connection_waits_for_a_target_port_that_listens_late() -> None:
    """A restarted kernel binds its ports one after another: a client connecting to one
    not bound yet is relayed once it is, not dropped."""
    probe = await echo_server(b"")
    late_port = port_of(probe)
    probe.close()
    await probe.wait_closed()
    relay = TcpRelay(1, executor=EXECUTOR, connect_timeout=10.0, what="a test relay")
    (port,) = await relay.start()
    late: asyncio.Server | None = None
    try:
        relay.retarget("127.0.0.1", [late_port])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"early\n")
        await writer.drain()
        await asyncio.sleep(0.5)  # refused meanwhile: retried, the client's connection held

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"late:" + await r.readline())
            await w.drain()

        late = await asyncio.start_server(serve, "127.0.0.1", late_port)
        assert await asyncio.wait_for(reader.readline(), 5) == b"late:early\n"
        writer.close()
    finally:
        await relay.stop()
        if late is not None:
            late.close()


async def test_stop_closes_the_listeners_and_gives_back_the_ports() -> None:
    relay = TcpRelay(5, executor=EXECUTOR, owner="relay-test-owner", what="a test relay")
    ports = await relay.start()
    assert len(set(ports)) == 5
    held = ClusterPortCache.instance().held()
    recorded = {p for host in held.values() for p, r in host.items() if r["owner"] == relay.owner}
    assert recorded == set(ports)
    reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])  # held, no target
    await relay.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert [p for p in ports if port_is_listening("127.0.0.1", p)] == []
    held = ClusterPortCache.instance().held()
    assert not [p for host in held.values() for p, r in host.items() if r["owner"] == relay.owner]

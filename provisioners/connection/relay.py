"""Local TCP listeners whose connections are relayed elsewhere: the shared relay core.

:func:`listen_on` and :func:`listen_allocated` bind a listener (the second on a port the
cluster port cache hands out); the SSH tunnels' threads use them too. :class:`LocalRelay`
holds listeners on the running event loop, opened once, and the connections they
accepted; a subclass says where a connection goes (:meth:`LocalRelay._serve`): a
Kubernetes port-forward websocket, or :class:`TcpRelay`'s plain TCP to an address that
can change. A kernel that moves (a restart puts it in a new pod, with a new IP) keeps
its client-side address: :meth:`TcpRelay.retarget` sends the listeners' connections to
the new address and ends those to the old one, and the clients' ZMQ sockets reconnect
through the same local ports. :class:`KernelRelay` is what a provisioner holds for that:
a kernel's five channels, followed from restart to restart, on a loop that keeps
running between a synchronous caller's calls (:class:`RelayLoop`, or an engine's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

from ..exceptions import TunnelError
from ..executor import EngineExecutor
from ..loopthread import LoopThread
from .ports import DEFAULT_PORT_RANGE, LOCAL_HOST, ClusterPortCache

__all__ = [
    "KernelRelay",
    "LocalRelay",
    "RelayLoop",
    "TcpRelay",
    "listen_allocated",
    "listen_on",
]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024

Logger = logging.Logger | logging.LoggerAdapter[Any]

T = TypeVar("T")


def listen_on(bind_host: str, port: int, what: str = "a relay") -> socket.socket:
    """A non-blocking listening socket on ``bind_host:port``; :class:`TunnelError` if the
    port cannot be bound."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind_host, port))
        listener.listen(64)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        msg = f"cannot listen on {bind_host}:{port} for {what}: {exc}"
        raise TunnelError(msg) from exc
    return listener


def listen_allocated(
    bind_host: str, owner: str, port_range: str = DEFAULT_PORT_RANGE, what: str = "a relay"
) -> socket.socket:
    """A listener on a port of ``port_range`` that the port cache hands ``owner`` (another
    one if some process binds it first); blocking. The port stays ``owner``'s until it is
    released; :class:`TunnelError` when none can be bound."""
    cache = ClusterPortCache.instance()
    for _ in range(5):
        (port,) = cache.allocate(1, owner, host=LOCAL_HOST, port_range=port_range)
        try:
            return listen_on(bind_host, port, what)
        except TunnelError:
            cache.release(owner, [port])
    msg = f"no local port of {port_range} could be bound for {what}"
    raise TunnelError(msg)


class LocalRelay:
    """Local TCP listeners on the running event loop, one per entry of ``ports``.

    A port of 0, or a port that cannot be bound (logged), takes one from the cluster
    port cache, held by ``owner`` until :meth:`stop`; :attr:`local_ports` tells which
    were used, in order. Each accepted connection runs :meth:`_serve` in a task of its
    own, ended by :meth:`stop`. Use it as an async context manager or through
    :meth:`start` / :meth:`stop`; both run on the loop the relay lives on.
    """

    def __init__(
        self,
        ports: Sequence[int],
        *,
        executor: EngineExecutor,
        host: str = "127.0.0.1",
        owner: str = "",
        port_range: str = DEFAULT_PORT_RANGE,
        what: str = "a relay",
        logger: Logger | None = None,
    ) -> None:
        self._wanted = [int(p) for p in ports]
        self.executor = executor
        self.host = host
        self.owner = owner or f"relay-{os.getpid()}-{id(self):x}"
        self.port_range = port_range
        self.what = what
        self.log: Logger = logger or log
        self.local_ports: list[int] = []
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._allocated = False

    async def __aenter__(self) -> LocalRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def active_connections(self) -> int:
        """Connections being served now."""
        return len(self._conns)

    async def start(self) -> list[int]:
        """Open the listeners (once); return the local ports. :class:`TunnelError` (and
        nothing left open) when a listener cannot be opened."""
        if self._servers:
            return self.local_ports
        try:
            for index, wanted in enumerate(self._wanted):
                server = await self._listen(index, wanted)
                self._servers.append(server)
                self.local_ports.append(server.sockets[0].getsockname()[1])
        except (OSError, TunnelError) as exc:
            await self.stop()
            msg = f"cannot listen on {self.host} for {self.what}: {exc}"
            raise TunnelError(msg) from exc
        return self.local_ports

    async def _listen(self, index: int, port: int) -> asyncio.Server:
        def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(self._handle(reader, writer, index))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

        if port:
            try:
                return await asyncio.start_server(handler, self.host, port, reuse_address=True)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                self.log.warning(
                    "Port %s of %s is taken; %s listens on another one", port, self.host, self.what
                )
        self._allocated = True
        sock = await self.executor.run(
            listen_allocated, self.host, self.owner, self.port_range, self.what
        )
        try:
            return await asyncio.start_server(handler, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        try:
            await self._serve(reader, writer, index)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        """Relay one connection accepted on listener ``index`` (closed afterwards)."""
        raise NotImplementedError

    def end_connections(self, tasks: Sequence[asyncio.Task[None]] | None = None) -> None:
        """End the connections served now (or only ``tasks``); the listeners stay open."""
        for task in list(self._conns) if tasks is None else tasks:
            task.cancel()

    async def stop(self) -> None:
        """Close the listeners and every relayed connection; give back cached ports."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        conns = list(self._conns)
        self.end_connections(conns)
        for task in conns:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.local_ports = []
        if self._allocated:
            self._allocated = False
            await self.executor.run(ClusterPortCache.instance().release, self.owner)


class TcpRelay(LocalRelay):
    """Listeners relaying raw TCP to the ports of a target host, which can change.

    Listener ``i`` relays to ``ports[i]`` of the target. :meth:`retarget` sends new
    connections to a new target and ends the ones to the old target: their clients
    reconnect, to the same local port, and reach the new one. Before the first
    :meth:`retarget`, and after :meth:`pause`, new connections are held (accepted, not
    yet relayed) until a target is set; a connection the target refuses is retried for
    up to ``connect_timeout`` seconds before it is closed.
    """

    def __init__(self, count: int, *, connect_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__([0] * count, **kwargs)
        self.connect_timeout = connect_timeout
        self._target: tuple[str, tuple[int, ...]] | None = None
        self._generation = 0
        self._targeted = asyncio.Event()
        self._moved = asyncio.Event()  # set, and replaced, at every change of target
        self._relayed: dict[asyncio.Task[None], int] = {}

    @property
    def target(self) -> tuple[str, list[int]] | None:
        """``(host, ports)`` the connections go to, or None while held."""
        return None if self._target is None else (self._target[0], list(self._target[1]))

    def retarget(self, host: str, ports: Sequence[int]) -> None:
        """Relay to ``host``'s ``ports`` from now on (one per listener); end the
        connections to another target. A call with the current target changes nothing."""
        target = (host, tuple(int(p) for p in ports))
        if len(target[1]) != len(self._wanted):
            msg = f"{self.what}: {len(target[1])} target ports for {len(self._wanted)} listeners"
            raise ValueError(msg)
        if target == self._target:
            return
        self._target = target
        self._end_relayed()
        self._targeted.set()

    def pause(self) -> None:
        """End every relayed connection and hold new ones until the next :meth:`retarget`
        (the target is going away, e.g. a kernel being restarted)."""
        self._target = None
        self._targeted.clear()
        self._end_relayed()

    def _end_relayed(self) -> None:
        self._generation += 1
        self._moved.set()
        self._moved = asyncio.Event()
        self.end_connections(list(self._relayed))

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        connected = await self._connect(index, reader)
        if connected is None:
            return
        generation, up_reader, up_writer = connected
        task = asyncio.current_task()
        assert task is not None
        try:
            self._relayed[task] = generation
            await _pipe_both(reader, writer, up_reader, up_writer)
        finally:
            self._relayed.pop(task, None)
            up_writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(up_writer.wait_closed(), 2)

    async def _connect(
        self, index: int, client: asyncio.StreamReader
    ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the current target's port ``index``: wait while held, and retry a
        refused connection for up to ``connect_timeout`` (a restarted kernel binds its
        ports one after another: its client's connection then waits instead of being
        dropped); start over on a new target. None when it cannot be reached."""
        loop = asyncio.get_running_loop()
        generation, deadline = -1, 0.0
        while True:
            while self._target is None:
                await self._targeted.wait()
            host, ports = self._target
            if generation != self._generation:
                generation, deadline = self._generation, loop.time() + self.connect_timeout
            left = deadline - loop.time()
            try:
                opened = await self._open(host, ports[index], min(max(left, 0.05), 1.0))
                if opened is None:
                    continue  # the target changed meanwhile
                up_reader, up_writer = opened
            except (OSError, asyncio.TimeoutError) as exc:
                if loop.time() >= deadline or client.at_eof():
                    self.log.debug(
                        "%s: cannot connect to %s:%s: %r", self.what, host, ports[index], exc
                    )
                    return None
                await asyncio.sleep(0.05)
                continue
            if generation == self._generation:
                return generation, up_reader, up_writer
            up_writer.close()  # retargeted while connecting

    async def _open(
        self, host: str, port: int, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to ``host:port`` within ``timeout`` (:class:`asyncio.TimeoutError`),
        or None as soon as the target changes: an attempt to an address that is gone (a
        removed container's or pod's IP) hangs until its timeout, and would hold a client
        that reconnected during a restart that long after the kernel is back."""
        attempt = asyncio.ensure_future(asyncio.open_connection(host, port))
        moved = asyncio.ensure_future(self._moved.wait())
        handed = False
        try:
            await asyncio.wait({attempt, moved}, timeout=timeout, return_when="FIRST_COMPLETED")
            if attempt.done():
                opened = attempt.result()
                handed = True
                return opened
            if moved.done():
                return None
            raise asyncio.TimeoutError
        finally:
            moved.cancel()
            if not handed:  # not handed over: cancelled, or closed if it made it
                attempt.cancel()
                await asyncio.gather(attempt, moved, return_exceptions=True)
                if not attempt.cancelled() and attempt.exception() is None:
                    attempt.result()[1].close()


class RelayLoop(LoopThread):
    """The loop that kernels' relays run on when their provisioner's hooks run on the
    caller's loop: a synchronous ``KernelManager`` stands that loop still between its
    calls, and a relay on it would stop relaying while a blocking client waits."""

    thread_name: ClassVar[str] = "relay-loop"
    _current: ClassVar[LoopThread | None] = None
    _exit_hook: ClassVar[bool] = False


class KernelRelay:
    """A kernel's client-side address that its restarts keep: a :class:`TcpRelay` with a
    listener on 127.0.0.1 per channel of ``names``, pointed at wherever the kernel runs.

    :meth:`follow` opens the listeners the first time and points them at the kernel's
    current address; :meth:`pause` holds new connections (and ends the relayed ones)
    while the kernel is replaced; :meth:`close` ends it all, at a full stop. With
    ``loop_thread`` the relay lives on that :class:`LoopThread`, held from the first
    :meth:`follow` until :meth:`close`; without it, on the caller's loop, which must keep
    running between calls (an engine's own loop). ``relay_args`` go to :class:`TcpRelay`.
    Provisioners build theirs with ``ClusterProvisioner.kernel_relay``.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        kernel_id: str,
        target: str = "",
        loop_thread: type[LoopThread] | None = None,
        **relay_args: Any,
    ) -> None:
        self.names = list(names)
        self.kernel_id = kernel_id
        self.target = target
        self._loop_type = loop_thread
        self._loop: LoopThread | None = None
        self._relay_args = relay_args
        self._relay: TcpRelay | None = None

    @property
    def relay(self) -> TcpRelay | None:
        """The listeners, once :meth:`follow` opened them."""
        return self._relay

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop_type is None:
            return await coro
        if self._loop is None:
            self._loop = self._loop_type.hold(self)
        return await self._loop.run(coro)

    async def follow(
        self, host: str, ports: dict[str, int], where: str = ""
    ) -> tuple[str, dict[str, int]]:
        """Relay to ``host``'s ``ports`` (by channel name) from now on; return the address
        clients use: the listeners' host and ports, the same after every restart.
        :class:`TunnelError`, naming the kernel and its target, when a listener cannot be
        opened (nothing left open)."""
        try:
            return await self._run(self._follow(host, [int(ports[n]) for n in self.names], where))
        except TunnelError as exc:
            raise TunnelError(str(exc), target=self.target, kernel_id=self.kernel_id) from exc

    async def _follow(self, host: str, ports: list[int], where: str) -> tuple[str, dict[str, int]]:
        relay = self._relay
        if relay is None:
            relay = TcpRelay(len(self.names), **self._relay_args)
            await relay.start()
            self._relay = relay
        if relay.target != (host, ports):
            relay.log.debug(
                "Kernel %s: local ports %s relay to %s at %s",
                self.kernel_id,
                relay.local_ports,
                where or "the kernel",
                host,
            )
            relay.retarget(host, ports)
        return relay.host, dict(zip(self.names, relay.local_ports, strict=True))

    async def pause(self) -> None:
        """Hold clients until the next :meth:`follow` (the kernel is being replaced)."""
        if self._relay is not None:
            await self._run(self._pause())

    async def _pause(self) -> None:
        if self._relay is not None:
            self._relay.pause()

    async def close(self) -> None:
        """Close the listeners and give back their ports and the loop (idempotent)."""
        relay, self._relay = self._relay, None
        loop, self._loop = self._loop, None
        try:
            if relay is not None:
                if loop is None:
                    await relay.stop()
                else:
                    await loop.run(relay.stop())
        finally:
            if loop is not None:
                loop.release(self)


async def _pipe_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side ends (ZMQ never half-closes)."""
    pipes = {
        asyncio.create_task(_pipe(a_reader, b_writer)),
        asyncio.create_task(_pipe(b_reader, a_writer)),
    }
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()

"""Local listeners relayed over an :class:`~.sshlink.SSHLink`: :class:`ForwardServer`.

A :class:`ForwardServer` holds local listeners; each accepted connection opens a
``direct-tcpip`` channel on the server's link and is relayed both ways by a thread. When
the transport drops, the next connection reconnects the link, and the kernels keep
running. Every server still open when the interpreter exits is closed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import selectors
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import paramiko

from ..exceptions import TunnelError
from .ports import DEFAULT_PORT_RANGE, ClusterPortCache
from .relay import listen_allocated, listen_on
from .sshconnect import BUFSIZE, THREAD_PREFIX, close_quietly
from .sshlink import SSHLink

__all__ = ["ForwardServer"]

logger = logging.getLogger(__name__)


@dataclass
class _Forward:
    listener: socket.socket
    port: int
    remote_host: str
    remote_port: int


class _Relay:
    """One accepted local connection, relayed over a ``direct-tcpip`` channel."""

    def __init__(
        self, server: ForwardServer, conn: socket.socket, peer: Any, fwd: _Forward
    ) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.remote = (fwd.remote_host, fwd.remote_port)
        self.chan: paramiko.Channel | None = None
        self.thread = threading.Thread(
            target=self._run,
            name=f"{THREAD_PREFIX}-relay-{server.name}-{fwd.port}",
            daemon=True,
        )

    def abort(self) -> None:
        chan = self.chan
        if chan is not None:
            close_quietly(chan)

    def _run(self) -> None:
        server, conn = self.server, self.conn
        try:
            try:
                origin = (str(self.peer[0]), int(self.peer[1]))
                self.chan = server.link.open_channel(*self.remote, origin)
            except TunnelError as exc:
                logger.debug("Tunnel %s: %s", server.name, exc)
                return
            if server.closed:
                return
            self._pump(conn, self.chan, server._stop_r)
        except (OSError, EOFError, ValueError, paramiko.SSHException) as exc:
            logger.debug("Tunnel %s: relay to %s:%s ended: %s", server.name, *self.remote, exc)
        finally:
            if self.chan is not None:
                close_quietly(self.chan)
            conn.close()
            server._relay_done(self)

    @staticmethod
    def _pump(conn: socket.socket, chan: paramiko.Channel, stop: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(conn, selectors.EVENT_READ, 0)
            sel.register(chan, selectors.EVENT_READ, 1)
            sel.register(stop, selectors.EVENT_READ, 2)
            while True:
                for key, _ in sel.select():
                    if key.data == 2:
                        return
                    if key.data == 0:
                        data = conn.recv(BUFSIZE)
                        if not data:
                            return
                        chan.sendall(data)
                    elif chan.recv_ready() or chan.closed or chan.eof_received:
                        data = chan.recv(BUFSIZE)
                        if not data:
                            return
                        conn.sendall(data)


class ForwardServer:
    """Local listeners whose connections are relayed through one :class:`SSHLink`.

    Each :meth:`forward` binds a listener on ``bind_host``; port 0 takes a port of
    ``port_range`` from the cluster-aware port cache, held by ``owner`` until
    :meth:`close`. One acceptor thread serves every listener and each accepted connection
    gets a relay thread. :meth:`close` (alias :meth:`shutdown`) stops everything, returns
    the ports and releases the link reference handed in.
    """

    def __init__(
        self,
        link: SSHLink,
        *,
        bind_host: str = "127.0.0.1",
        name: str = "tunnel",
        port_range: str = DEFAULT_PORT_RANGE,
        owner: str = "",
    ) -> None:
        self.link = link
        self.bind_host = bind_host
        self.name = name
        self.port_range = port_range
        self.owner = owner or f"tunnel-{name}-{os.getpid()}-{id(self):x}"
        self._allocated = False
        self._forwards: dict[int, _Forward] = {}
        self._pending: list[_Forward] = []
        self._relays: set[_Relay] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ctl_r, self._ctl_w = socket.socketpair()
        self._stop_r, self._stop_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._ctl_r, selectors.EVENT_READ)
        self._selector.register(self._stop_r, selectors.EVENT_READ)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"{THREAD_PREFIX}-accept-{name}", daemon=True
        )
        self._acceptor.start()
        _LIVE_SERVERS.add(self)

    # -- public

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def local_ports(self) -> list[int]:
        with self._lock:
            return list(self._forwards)

    @property
    def server_address(self) -> tuple[str, int]:
        """``(bind_host, port)`` of the first listener, as socketserver names it."""
        ports = self.local_ports
        return self.bind_host, ports[0] if ports else 0

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._relays)

    def forward(self, local_port: int, remote_host: str, remote_port: int) -> int:
        """Listen on ``local_port`` (0: one from the port cache) and relay each connection
        to ``remote_host:remote_port`` as seen from the SSH server; return the port."""
        listener = self._listen_allocated() if not local_port else self._listen(local_port)
        port = listener.getsockname()[1]
        fwd = _Forward(listener, port, remote_host, int(remote_port))
        with self._lock:
            if self.closed:
                listener.close()
                raise TunnelError(f"tunnel {self.name} is closed")
            self._forwards[port] = fwd
            self._pending.append(fwd)
        self._ctl_w.send(b"+")
        return port

    def _listen(self, port: int) -> socket.socket:
        return listen_on(self.bind_host, port, f"tunnel {self.name}")

    def _listen_allocated(self) -> socket.socket:
        """A listener on a port the cache hands out (held until :meth:`close`)."""
        self._allocated = True
        return listen_allocated(self.bind_host, self.owner, self.port_range, f"tunnel {self.name}")

    def retarget(self, local_port: int, remote_host: str, remote_port: int) -> None:
        """Send new connections on ``local_port`` to another remote address."""
        with self._lock:
            fwd = self._forwards[local_port]
            fwd.remote_host, fwd.remote_port = remote_host, int(remote_port)

    def close(self) -> None:
        """Stop listening, end every relay and release the link."""
        with self._lock:
            if self.closed:
                return
            self._closed.set()
            relays = list(self._relays)
            forwards = list(self._forwards.values())
        self._stop_w.send(b"!")
        if threading.current_thread() is not self._acceptor:
            self._acceptor.join(timeout=5)
        for fwd in forwards:
            fwd.listener.close()
        for relay in relays:
            relay.abort()
        for relay in relays:
            if relay.thread is not threading.current_thread():
                relay.thread.join(timeout=2)
        for sock in (self._ctl_r, self._ctl_w, self._stop_r, self._stop_w):
            sock.close()
        if self._allocated:
            ClusterPortCache.instance().release(self.owner)
        self.link.release()
        _LIVE_SERVERS.discard(self)

    shutdown = close

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until closed; False on timeout."""
        return self._closed.wait(timeout)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Block until :meth:`close` (the listeners are served from the start)."""
        while not self._closed.wait(poll_interval):
            pass

    def __enter__(self) -> ForwardServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- threads

    def _accept_loop(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._stop_r:
                        return
                    if sock is self._ctl_r:
                        self._ctl_r.recv(1024)
                        with self._lock:
                            pending, self._pending = self._pending, []
                        for fwd in pending:
                            self._selector.register(fwd.listener, selectors.EVENT_READ, fwd)
                        continue
                    self._accept(key.data)
        except (OSError, ValueError) as exc:
            if not self.closed:
                logger.warning("Tunnel %s: acceptor stopped: %s", self.name, exc)
        finally:
            self._selector.close()

    def _accept(self, fwd: _Forward) -> None:
        try:
            conn, peer = fwd.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self.closed:
                conn.close()
                return
            relay = _Relay(self, conn, peer, fwd)
            self._relays.add(relay)
        relay.thread.start()

    def _relay_done(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)


_LIVE_SERVERS: weakref.WeakSet[ForwardServer] = weakref.WeakSet()


@atexit.register
def _close_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.close()

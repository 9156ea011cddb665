"""SSH port forwarding over the shared links of :mod:`provisioners.connection.sshlink`.

A :class:`ForwardServer` holds local listeners; each accepted connection opens a
``direct-tcpip`` channel on the server's :class:`~provisioners.connection.sshlink.SSHLink` and is
relayed both ways by a thread. When the transport drops, the next connection reconnects
the link, and the kernels keep running.

jupyter_client's API is offered with the seed's signatures: :func:`ssh_tunnel`,
:func:`forward_tunnel` (``local_port, remote_port, remote_host, ssh_server``: the seed's
order, not jupyter_client's) and :func:`tunnel_to_kernel`. Host keys are checked against
known_hosts, never accepted silently; their knobs come from the environment
(``CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS``, ``..._ACCEPT_UNKNOWN_HOST_KEYS``,
``..._CONNECT_TIMEOUT``: see :mod:`provisioners.connection.sshlink`).

Provisioners use :class:`KernelTunnels`, configured from their ``ssh_*`` traits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from ..exceptions import TunnelError
from .ports import DEFAULT_PORT_RANGE, LOCAL_HOST, ClusterPortCache
from .sshlink import (
    _BUFSIZE,
    THREAD_PREFIX,
    SSHLink,
    SSHSettings,
    _close_quietly,
    _env_connect_timeout,
)

if TYPE_CHECKING:
    from ..base import ClusterProvisioner

__all__ = [
    "KERNEL_PORT_NAMES",
    "ForwardServer",
    "KernelTunnels",
    "TunnelPorts",
    "TunnelProcess",
    "forward_tunnel",
    "ssh_tunnel",
    "tunnel_to_kernel",
]

logger = logging.getLogger(__name__)

#: Local ports of :func:`tunnel_to_kernel`, in jupyter_client's order.
KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: Bind addresses that mean "every interface": reached as 127.0.0.1 from the SSH server.
_WILDCARD_IPS = frozenset({"", "0.0.0.0", "*", "localhost", "::"})


# ---------------------------------------------------------------------- forwarding


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
            _close_quietly(chan)

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
                _close_quietly(self.chan)
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
                        data = conn.recv(_BUFSIZE)
                        if not data:
                            return
                        chan.sendall(data)
                    elif chan.recv_ready() or chan.closed or chan.eof_received:
                        data = chan.recv(_BUFSIZE)
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
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.bind_host, port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            msg = f"cannot listen on {self.bind_host}:{port} for a tunnel: {exc}"
            raise TunnelError(msg) from exc
        return listener

    def _listen_allocated(self) -> socket.socket:
        """A listener on a port the cache hands out (retried if someone else binds it)."""
        cache = ClusterPortCache.instance()
        for _ in range(5):
            (port,) = cache.allocate(1, self.owner, host=LOCAL_HOST, port_range=self.port_range)
            self._allocated = True
            try:
                return self._listen(port)
            except TunnelError:
                cache.release(self.owner, [port])
        msg = f"no local port of {self.port_range} could be bound for tunnel {self.name}"
        raise TunnelError(msg)

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


# ---------------------------------------------------------------------- kernel tunnels


def _reachable_ip(ip: str | None) -> str:
    """The address the SSH server dials for a kernel bound to ``ip``."""
    return "127.0.0.1" if (ip or "") in _WILDCARD_IPS else str(ip)


class KernelTunnels:
    """The channel tunnels of one kernel, over the shared :class:`SSHLink` to a server.

    Local ports on 127.0.0.1 come from the cluster-aware port cache (``port_range``, owner
    ``tunnel-<kernel id>``) and are returned on :meth:`close`. Not from the OS (port 0):
    those lie in the ephemeral range, where jupyter_client's stock provisioner also picks
    ports for kernels that bind them only later, so a listener could take a port a
    kernel is about to bind; the cache's range lies below it and the cache knows our own
    kernels' ports, across processes. Opening again (a restart) keeps each channel's local
    port and retargets it, so connected clients keep working. Use ``await open(...)`` /
    ``await close()``, ``start``/``stop``, or ``async with``.
    """

    def __init__(
        self,
        server: str,
        *,
        key_file: str = "",
        password: str = "",
        known_hosts: str = "",
        accept_unknown_host_keys: bool | None = None,
        connect_timeout: float | None = None,
        name: str = "kernel",
        port_range: str = DEFAULT_PORT_RANGE,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.settings = SSHSettings.from_server(
            server,
            key_file=key_file,
            password=password,
            known_hosts=known_hosts,
            accept_unknown_host_keys=accept_unknown_host_keys,
            connect_timeout=connect_timeout,
        )
        self.name = name
        self.port_range = port_range
        self.log = log or logger
        self._forwarder: ForwardServer | None = None
        self._ports: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_provisioner(cls, provisioner: ClusterProvisioner) -> KernelTunnels:
        """Tunnels configured by a provisioner's ``ssh_*`` traits."""
        return cls(
            provisioner.ssh_server,
            key_file=provisioner.ssh_key,
            password=provisioner.ssh_password,
            known_hosts=provisioner.ssh_known_hosts,
            accept_unknown_host_keys=provisioner.ssh_accept_unknown_host_keys,
            connect_timeout=provisioner.ssh_connect_timeout,
            name=f"kernel-{provisioner.kernel_id}",
            port_range=provisioner.port_range,
            log=provisioner.log,
        )

    @property
    def ports(self) -> dict[str, int]:
        """Local port per channel name."""
        return dict(self._ports)

    @property
    def link(self) -> SSHLink | None:
        return self._forwarder.link if self._forwarder is not None else None

    @property
    def is_open(self) -> bool:
        return self._forwarder is not None

    async def open(self, remote_ip: str, ports: Mapping[str, int]) -> dict[str, int]:
        """Forward each named remote port of ``remote_ip``; return the local ports."""
        return await asyncio.to_thread(self._open, remote_ip, dict(ports))

    async def close(self) -> None:
        """Close the listeners and relays and release the SSH link."""
        await asyncio.to_thread(self._close)

    start = open
    stop = close

    async def __aenter__(self) -> KernelTunnels:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _open(self, remote_ip: str, ports: dict[str, int]) -> dict[str, int]:
        target = _reachable_ip(remote_ip)
        with self._lock:
            created = self._forwarder is None
            if self._forwarder is None:
                self._forwarder = ForwardServer(
                    SSHLink.acquire(self.settings),
                    name=self.name,
                    port_range=self.port_range,
                    owner=f"tunnel-{self.name.removeprefix('kernel-')}",
                )
            else:
                self._forwarder.link.transport()  # fail now if the server went away
            forwarder = self._forwarder
            try:
                local: dict[str, int] = {}
                for name, remote_port in ports.items():
                    port = self._ports.get(name)
                    if port is None:
                        port = self._ports[name] = forwarder.forward(0, target, remote_port)
                    else:
                        forwarder.retarget(port, target, remote_port)
                    local[name] = port
            except BaseException:
                if created:
                    forwarder.close()
                    self._forwarder, self._ports = None, {}
                raise
        self.log.debug(
            "Tunnels %s: %d ports of %s forwarded through %s",
            self.name,
            len(local),
            target,
            self.settings.address,
        )
        return local

    def _close(self) -> None:
        with self._lock:
            forwarder, self._forwarder, self._ports = self._forwarder, None, {}
        if forwarder is not None:
            forwarder.close()
            self.log.debug("Tunnels %s closed", self.name)


# ---------------------------------------------------------------------- jupyter_client API


class TunnelProcess:
    """What :func:`ssh_tunnel` returns, in place of jupyter_client's ``subprocess.Popen``.

    The tunnel is a thread of this process, not an ``ssh`` process, so there is no
    ``pid``; ``poll()``, ``wait()``, ``terminate()``, ``kill()``, ``send_signal()`` and
    ``returncode`` behave like Popen's (``returncode`` is ``-signum`` after a stop). The
    tunnel lives until stopped or until the interpreter exits.
    """

    def __init__(self, server: ForwardServer, local_port: int, args: list[str]) -> None:
        self.server = server
        self.local_port = local_port
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.server.closed:
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.server.wait_closed(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        result = self.poll()
        return 0 if result is None else result

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.returncode = -int(sig)
        self.server.close()

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> TunnelProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()


class TunnelPorts(tuple):  # type: ignore[type-arg]
    """The five local ports of :func:`tunnel_to_kernel` (shell, iopub, stdin, hb, control).

    A plain tuple to jupyter_client callers, plus :meth:`close` to end the tunnels.
    """

    server: ForwardServer

    def __new__(cls, ports: list[int], server: ForwardServer) -> TunnelPorts:
        obj = super().__new__(cls, ports)
        obj.server = server
        return obj

    def close(self) -> None:
        self.server.close()


def _forward_server(settings: SSHSettings, name: str) -> ForwardServer:
    return ForwardServer(SSHLink.acquire(settings), name=name)


def forward_tunnel(
    local_port: int,
    remote_port: int,
    remote_host: str,
    ssh_server: str,
    ssh_keyfile: str | None = None,
    password: str | None = None,
) -> ForwardServer:
    """Listen on 127.0.0.1:``local_port`` (0: a port from the port cache) and forward to
    ``remote_host:remote_port`` as seen from ``ssh_server``. Returns the running
    :class:`ForwardServer` (``close()`` it; ``server_address`` names the port).

    Unlike jupyter_client's, it does not block and takes the seed's argument order.
    """
    settings = SSHSettings.from_server(ssh_server, key_file=ssh_keyfile, password=password)
    server = _forward_server(settings, f"forward-{local_port}")
    try:
        server.forward(local_port, remote_host, remote_port)
    except BaseException:
        server.close()
        raise
    return server


def ssh_tunnel(
    lport: int,
    rport: int,
    server: str,
    remoteip: str = "127.0.0.1",
    keyfile: str | None = None,
    password: str | None = None,
    timeout: float = 0.4,
) -> TunnelProcess:
    """Tunnel 127.0.0.1:``lport`` (0: a port from the port cache) to ``remoteip:rport``
    through ``server``.

    Returns a :class:`TunnelProcess` (a Popen-like handle without ``pid``) instead of an
    ``ssh`` process. ``timeout`` is a lower bound on the connect timeout: jupyter_client's
    0.4 s default is the lifetime of its remote ``sleep``, far too short to connect, so the
    module's connect timeout applies when larger. The tunnel lasts until ``terminate()``.
    """
    settings = SSHSettings.from_server(
        server,
        key_file=keyfile,
        password=password or None,
        connect_timeout=max(float(timeout or 0), _env_connect_timeout()),
    )
    forwarder = _forward_server(settings, f"tunnel-{lport}")
    try:
        port = forwarder.forward(lport, remoteip, rport)
    except BaseException:
        forwarder.close()
        raise
    args = ["ssh-tunnel", f"{port}:{remoteip}:{rport}", settings.address]
    return TunnelProcess(forwarder, port, args)


def tunnel_to_kernel(
    connection_info: Mapping[str, Any] | str | os.PathLike[str],
    sshserver: str,
    sshkey: str | None = None,
) -> TunnelPorts:
    """Tunnel a kernel's five channels through ``sshserver``.

    ``connection_info`` is a dict or a connection file path. Returns the local ports in the
    order shell, iopub, stdin, hb, control (a tuple with a ``close()`` method).
    """
    if isinstance(connection_info, str | os.PathLike):
        info = json.loads(Path(connection_info).read_text())
    else:
        info = dict(connection_info)
    settings = SSHSettings.from_server(sshserver, key_file=sshkey)
    remote_ip = _reachable_ip(info.get("ip"))
    forwarder = _forward_server(settings, "kernel")
    try:
        ports = [forwarder.forward(0, remote_ip, int(info[name])) for name in KERNEL_PORT_NAMES]
    except BaseException:
        forwarder.close()
        raise
    return TunnelPorts(ports, forwarder)

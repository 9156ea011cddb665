"""SSH port forwarding over the shared links of :mod:`provisioners.connection.sshlink`.

The forwarding itself is :class:`~provisioners.connection.forwarding.ForwardServer`
(importable from here too): local listeners relayed over ``direct-tcpip`` channels of the
server's shared :class:`~provisioners.connection.sshlink.SSHLink`.

jupyter_client's API is offered with the seed's signatures: :func:`ssh_tunnel`,
:func:`forward_tunnel` (``local_port, remote_port, remote_host, ssh_server``: the seed's
order, not jupyter_client's) and :func:`tunnel_to_kernel`. Host keys are checked against
known_hosts, never accepted silently; their knobs come from the environment
(``CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS``, ``..._ACCEPT_UNKNOWN_HOST_KEYS``,
``..._CONNECT_TIMEOUT``: see :mod:`provisioners.connection.sshlink`).

Provisioners use :class:`KernelTunnels`, configured from their ``ssh_*`` traits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import PORT_NAMES
from .forwarding import ForwardServer
from .ports import DEFAULT_PORT_RANGE
from .sshconnect import SSHSettings, env_connect_timeout
from .sshlink import SSH_EXECUTOR, SSHLink

if TYPE_CHECKING:
    from ..lifecycle.base import ClusterProvisioner

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
KERNEL_PORT_NAMES = PORT_NAMES
#: Bind addresses that mean "every interface": reached as 127.0.0.1 from the SSH server.
_WILDCARD_IPS = frozenset({"", "0.0.0.0", "*", "localhost", "::"})


# ---------------------------------------------------------------------- forwarding


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
        server: str | SSHSettings,
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
        """``server`` is ``[user@]host[:port]`` with the knobs given here, or the
        :class:`SSHSettings` to use as they are (the knobs are then ignored)."""
        if isinstance(server, SSHSettings):
            self.settings = server
        else:
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
        """Tunnels through the provisioner's ``ssh_server``, configured by its ``ssh_*``
        settings (:meth:`~provisioners.settings.SharedSettings.ssh_settings`)."""
        return cls(
            provisioner.ssh_settings(),
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
        return await SSH_EXECUTOR.run(self._open, remote_ip, dict(ports))

    async def close(self) -> None:
        """Close the listeners and relays and release the SSH link."""
        await SSH_EXECUTOR.run(self._close)

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
        connect_timeout=max(float(timeout or 0), env_connect_timeout()),
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

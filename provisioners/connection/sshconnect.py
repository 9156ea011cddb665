"""SSH settings, the host-key policy and opening one authenticated paramiko transport.

:class:`SSHSettings` says how to reach and authenticate to a server;
:func:`parse_server` and :func:`format_server` read and write ``[user@]host[:port]``.
Host keys are checked against known_hosts, never accepted silently; a changed key is
always refused. Knobs a caller leaves unset come from the environment, read at each call:

``CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS``
    the known_hosts file (default ``~/.ssh/known_hosts``).
``CLUSTER_PROVISIONERS_SSH_ACCEPT_UNKNOWN_HOST_KEYS``
    ``1``/``true``/``yes``: accept a host key known_hosts does not list. It is remembered
    for this process (so a later change is refused) but never written to the file.
``CLUSTER_PROVISIONERS_SSH_CONNECT_TIMEOUT``
    seconds to connect and authenticate (default 10).

:func:`connect_client` opens the connection that :class:`~.sshlink.SSHLink` shares.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from ..exceptions import (
    HostKeyError,
    ProvisionerConfigError,
    SSHAuthenticationError,
    SSHUnreachableError,
    TunnelError,
)

__all__ = [
    "BUFSIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KNOWN_HOSTS",
    "ENV_ACCEPT_UNKNOWN",
    "ENV_CONNECT_TIMEOUT",
    "ENV_KNOWN_HOSTS",
    "KEEPALIVE_INTERVAL",
    "THREAD_PREFIX",
    "SSHSettings",
    "close_quietly",
    "connect_client",
    "env_connect_timeout",
    "format_server",
    "parse_server",
]

logger = logging.getLogger(__name__)
#: paramiko's transport log. A refused channel (a kernel port not yet bound) is routine
#: here and logged by the tunnel relay at DEBUG; paramiko would log it at ERROR.
_transport_logger = logging.getLogger(f"{__name__}.transport")
_transport_logger.addFilter(lambda record: "open FAILED" not in record.getMessage())

ENV_KNOWN_HOSTS = "CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS"
ENV_ACCEPT_UNKNOWN = "CLUSTER_PROVISIONERS_SSH_ACCEPT_UNKNOWN_HOST_KEYS"
ENV_CONNECT_TIMEOUT = "CLUSTER_PROVISIONERS_SSH_CONNECT_TIMEOUT"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Name prefix of every thread of the SSH layer: transports here, acceptors and relays
#: in :mod:`provisioners.connection.forwarding`.
THREAD_PREFIX = "cluster-ssh"
KEEPALIVE_INTERVAL = 30
#: Read size of remote command output and of tunnel relays.
BUFSIZE = 65536
_TRUE = frozenset({"1", "true", "yes", "on"})


# ---------------------------------------------------------------------- settings


def parse_server(server: str) -> tuple[str, str, int]:
    """Split ``[ssh://][user@]host[:port]`` (IPv6 as ``[addr]:port``) into user, host, port.

    The user defaults to the local user name and the port to 22.
    """
    text = server.strip()
    text = text.removeprefix("ssh://")
    user, _, hostport = text.rpartition("@")
    port_text = ""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host = hostport
    try:
        port = int(port_text) if port_text else 22
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536 or any(c.isspace() for c in text):
        msg = f"ssh_server {server!r} is not '[user@]host[:port]'"
        raise ProvisionerConfigError(msg, key="ssh_server")
    return user or getpass.getuser(), host, port


def format_server(user: str, host: str, port: int = 22) -> str:
    """``user@host:port`` (IPv6 hosts in brackets): the inverse of :func:`parse_server`."""
    shown = f"[{host}]" if ":" in host else host
    return f"{user}@{shown}:{port}" if user else f"{shown}:{port}"


def env_connect_timeout() -> float:
    try:
        return float(os.environ.get(ENV_CONNECT_TIMEOUT, "") or DEFAULT_CONNECT_TIMEOUT)
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT


@dataclass(frozen=True)
class SSHSettings:
    """How to reach and authenticate to one SSH server."""

    host: str
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    key_file: str = ""
    password: str = field(default="", repr=False)
    known_hosts: str = ""
    accept_unknown_host_keys: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @classmethod
    def from_server(
        cls,
        server: str,
        *,
        key_file: str | None = None,
        password: str | None = None,
        known_hosts: str | None = None,
        accept_unknown_host_keys: bool | None = None,
        connect_timeout: float | None = None,
    ) -> SSHSettings:
        """Settings for ``server``; unset knobs come from the environment (module doc)."""
        user, host, port = parse_server(server)
        if accept_unknown_host_keys is None:
            accept_unknown_host_keys = os.environ.get(ENV_ACCEPT_UNKNOWN, "").lower() in _TRUE
        return cls(
            host=host,
            port=port,
            user=user,
            key_file=key_file or "",
            password=password or "",
            known_hosts=known_hosts or os.environ.get(ENV_KNOWN_HOSTS, ""),
            accept_unknown_host_keys=accept_unknown_host_keys,
            connect_timeout=connect_timeout or env_connect_timeout(),
        )

    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        return format_server(self.user, self.host, self.port)

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()

    @property
    def key_path(self) -> str:
        return str(Path(self.key_file).expanduser()) if self.key_file else ""

    def link_key(self) -> tuple[Any, ...]:
        """What makes two settings share one transport (the password only as a digest)."""
        secret = hashlib.sha256(self.password.encode()).hexdigest() if self.password else ""
        return (
            self.host.lower(),
            self.port,
            self.user,
            self.key_path,
            secret,
            str(self.known_hosts_path),
            self.accept_unknown_host_keys,
        )


# ---------------------------------------------------------------------- connecting


def _fingerprint(key: paramiko.PKey) -> str:
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


#: Host keys accepted with ``accept_unknown_host_keys`` in this process: a later
#: different key for the same host is then refused as a changed key. Only connections
#: that accept unknown keys themselves consult it.
_ACCEPTED_KEYS = paramiko.HostKeys()
_ACCEPTED_LOCK = threading.Lock()


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys, or accept and remember them when explicitly allowed."""

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        known = self.settings.known_hosts_path
        if not self.settings.accept_unknown_host_keys:
            port = f"-p {self.settings.port} " if self.settings.port != 22 else ""
            msg = (
                f"SSH host key of {hostname} ({_fingerprint(key)}) is not in {known}; "
                f"verify it and add it (e.g. ssh-keyscan {port}{self.settings.host} >> {known}), "
                "or set accept_unknown_host_keys"
            )
            raise HostKeyError(msg)
        with _ACCEPTED_LOCK:
            _ACCEPTED_KEYS.add(hostname, key.get_name(), key)
        logger.warning(
            "Accepting the unknown SSH host key of %s (%s) for this process; it is not "
            "written to %s",
            hostname,
            _fingerprint(key),
            known,
        )


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckSocket(socket.socket):
    """The SSH connection's socket: acknowledges what it receives at once (Linux).

    sshd leaves Nagle's algorithm on for connections without a terminal, so a burst of
    small SSH packets (a kernel's replies) would wait for each ACK, which a receiver
    delays by up to 40 ms. Re-arming TCP_QUICKACK after every read avoids that stall.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if _TCP_QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return data


def connect_client(settings: SSHSettings) -> paramiko.SSHClient:
    """An authenticated client for ``settings``; named errors for every failure."""
    timeout = settings.connect_timeout
    where = settings.address
    key_path = settings.key_path
    if key_path and not os.access(key_path, os.R_OK):
        msg = f"SSH key file {key_path} for {where} does not exist or cannot be read"
        raise SSHAuthenticationError(msg)
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=timeout)
    except socket.gaierror as exc:
        msg = f"SSH server {where}: cannot resolve {settings.host!r}: {exc.strerror or exc}"
        raise SSHUnreachableError(msg) from exc
    except TimeoutError as exc:
        msg = f"SSH server {where} did not answer within {timeout:g} s"
        raise SSHUnreachableError(msg) from exc
    except OSError as exc:
        msg = f"SSH server {where} cannot be reached: {exc.strerror or exc}"
        raise SSHUnreachableError(msg) from exc
    sock = _QuickAckSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = paramiko.SSHClient()
    client.set_log_channel(_transport_logger.name)
    try:
        known = settings.known_hosts_path
        if known.is_file():
            client.load_system_host_keys(str(known))
        if settings.accept_unknown_host_keys:
            with _ACCEPTED_LOCK:
                for hostname in _ACCEPTED_KEYS:
                    for key_type, key in _ACCEPTED_KEYS[hostname].items():
                        client.get_host_keys().add(hostname, key_type, key)
        client.set_missing_host_key_policy(_HostKeyPolicy(settings))
        client.connect(
            settings.host,
            settings.port,
            username=settings.user,
            password=settings.password or None,
            key_filename=key_path or None,
            timeout=timeout,
            allow_agent=True,
            look_for_keys=not (key_path or settings.password),
            sock=sock,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except BaseException as exc:
        client.close()
        sock.close()
        _raise_connect_error(exc, settings)
        raise
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(KEEPALIVE_INTERVAL)
        transport.name = f"{THREAD_PREFIX}-transport-{where}"
    return client


def _raise_connect_error(exc: BaseException, settings: SSHSettings) -> None:
    """Translate paramiko's errors into ours (returns for errors to re-raise as is)."""
    where = settings.address
    if isinstance(exc, HostKeyError):
        return
    if isinstance(exc, paramiko.BadHostKeyException):
        msg = (
            f"SSH host key of {where} has CHANGED: the server offers "
            f"{_fingerprint(exc.key)} but {_fingerprint(exc.expected_key)} is expected "
            f"({settings.known_hosts_path}, or accepted earlier by this process). Refusing "
            "to connect (possible man-in-the-middle); if the change is expected, replace "
            "the known_hosts line"
        )
        raise HostKeyError(msg) from exc
    how = ", ".join(
        what
        for what, used in (
            (f"key {settings.key_path}", settings.key_path),
            ("password", settings.password),
            ("agent/default keys", not (settings.key_path or settings.password)),
        )
        if used
    )
    if isinstance(exc, paramiko.AuthenticationException) or (
        isinstance(exc, paramiko.SSHException) and "authentication" in str(exc).lower()
    ):
        msg = f"SSH authentication as {settings.user!r} to {where} failed ({how}): {exc}"
        raise SSHAuthenticationError(msg) from exc
    if isinstance(exc, TimeoutError):
        limit = settings.connect_timeout
        msg = f"SSH server {where} did not complete the handshake within {limit:g} s"
        raise TunnelError(msg) from exc
    if isinstance(exc, paramiko.SSHException | EOFError | OSError):
        msg = f"SSH connection to {where} failed: {exc or type(exc).__name__}"
        raise TunnelError(msg) from exc


class _Unsignalled:
    """Stands in for a closing channel's readiness pipe: signals nothing."""

    def set(self) -> None:
        """Nothing to wake: the channel is closing."""

    def clear(self) -> None:
        """Nothing to reset."""


_UNSIGNALLED = _Unsignalled()


def close_quietly(chan: paramiko.Channel) -> None:
    """Close ``chan``; closing writes to the transport, which may have just died.

    A channel that was selected on has a readiness pipe, which paramiko closes in the
    closing thread while the transport's thread may be feeding the channel data and
    writing to that pipe under the buffer's lock only. The write then fails with EBADF
    (or EPIPE) in the transport's thread, which ends the whole SSH connection and every
    channel on it (other kernels' requests in flight are lost), or lands in whatever
    file took the closed fd's number. So the channel's buffers stop signalling the pipe
    first, under their own locks: no feed can be touching it when it closes.
    """
    for buffer in (chan.in_buffer, chan.in_stderr_buffer):
        buffer.set_event(_UNSIGNALLED)
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()

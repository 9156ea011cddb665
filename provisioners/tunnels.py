"""SSH tunnels on paramiko: checked host keys, no prompts, one shared transport per server.

A :class:`SSHLink` is one authenticated SSH transport to a server, shared by everything
in this process that uses the same server, user, port, key and host-key policy (kernel
tunnels, the SSH target's remote commands and SFTP). It reconnects on demand: when the
transport drops, the next tunnelled connection or command opens a new one, and the
kernels keep running. A :class:`ForwardServer` holds local listeners; each accepted
connection opens a ``direct-tcpip`` channel and is relayed both ways by a thread.

jupyter_client's API is offered with the seed's signatures: :func:`ssh_tunnel`,
:func:`forward_tunnel` (``local_port, remote_port, remote_host, ssh_server``: the seed's
order, not jupyter_client's) and :func:`tunnel_to_kernel`. Host keys are checked against
known_hosts, never accepted silently; a changed key is always refused. Their knobs come
from the environment, read at each call:

``CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS``
    the known_hosts file (default ``~/.ssh/known_hosts``).
``CLUSTER_PROVISIONERS_SSH_ACCEPT_UNKNOWN_HOST_KEYS``
    ``1``/``true``/``yes``: accept a host key known_hosts does not list. It is remembered
    for this process (so a later change is refused) but never written to the file.
``CLUSTER_PROVISIONERS_SSH_CONNECT_TIMEOUT``
    seconds to connect and authenticate (default 10).

Provisioners use :class:`KernelTunnels`, configured from their ``ssh_*`` traits.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import getpass
import hashlib
import json
import logging
import os
import secrets
import selectors
import shlex
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from .exceptions import (
    HostKeyError,
    ProvisionerConfigError,
    SSHAuthenticationError,
    SSHUnreachableError,
    TunnelError,
)
from .ports import DEFAULT_PORT_RANGE, LOCAL_HOST, ClusterPortCache

if TYPE_CHECKING:
    from .base import ClusterProvisioner

__all__ = [
    "CommandResult",
    "ForwardServer",
    "KernelTunnels",
    "SSHLink",
    "SSHSettings",
    "TunnelPorts",
    "TunnelProcess",
    "format_server",
    "forward_tunnel",
    "parse_server",
    "ssh_tunnel",
    "tunnel_to_kernel",
]

logger = logging.getLogger(__name__)
#: paramiko's transport log. A refused channel (a kernel port not yet bound) is routine
#: here and logged by the relay at DEBUG; paramiko would log it at ERROR.
_transport_logger = logging.getLogger(f"{__name__}.transport")
_transport_logger.addFilter(lambda record: "open FAILED" not in record.getMessage())

ENV_KNOWN_HOSTS = "CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS"
ENV_ACCEPT_UNKNOWN = "CLUSTER_PROVISIONERS_SSH_ACCEPT_UNKNOWN_HOST_KEYS"
ENV_CONNECT_TIMEOUT = "CLUSTER_PROVISIONERS_SSH_CONNECT_TIMEOUT"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Local ports of :func:`tunnel_to_kernel`, in jupyter_client's order.
KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: Name prefix of every thread this module starts (transports, acceptors, relays).
THREAD_PREFIX = "cluster-ssh"
KEEPALIVE_INTERVAL = 30
_BUFSIZE = 65536
#: After a failed (re)connect, further attempts fail at once for this many seconds.
_RECONNECT_BACKOFF = 1.0
#: Bind addresses that mean "every interface": reached as 127.0.0.1 from the SSH server.
_WILDCARD_IPS = frozenset({"", "0.0.0.0", "*", "localhost", "::"})
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


def _env_connect_timeout() -> float:
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
            connect_timeout=connect_timeout or _env_connect_timeout(),
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


def _connect_client(settings: SSHSettings) -> paramiko.SSHClient:
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


def _close_quietly(chan: paramiko.Channel) -> None:
    """Close ``chan``; closing writes to the transport, which may have just died."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a remote command."""

    returncode: int
    stdout: str
    stderr: str


class SSHLink:
    """One SSH transport to a server, shared per settings, re-established on demand.

    Get one with :meth:`acquire` (blocking: call it in a thread) and give it back with
    :meth:`release`; the transport closes when the last user releases it.
    """

    _registry: dict[tuple[Any, ...], SSHLink] = {}
    _registry_lock = threading.Lock()

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings
        self.reconnects = 0
        self.closed = False
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._refs = 0
        self._connected_once = False
        self._failure: TunnelError | None = None
        self._failed_at = 0.0
        self._shell = _RemoteShell(self)
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()

    @classmethod
    def acquire(cls, settings: SSHSettings) -> SSHLink:
        """The shared link for ``settings``, connected (named errors on failure)."""
        key = settings.link_key()
        with cls._registry_lock:
            link = cls._registry.get(key)
            if link is None:
                link = cls._registry[key] = cls(settings)
            link._refs += 1
        try:
            link.transport()
        except BaseException:
            link.release()
            raise
        return link

    @classmethod
    def active(cls) -> list[SSHLink]:
        """The links currently held by someone in this process."""
        with cls._registry_lock:
            return list(cls._registry.values())

    def release(self) -> None:
        """Drop one reference; the last one closes the transport."""
        with SSHLink._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            key = self.settings.link_key()
            if SSHLink._registry.get(key) is self:
                del SSHLink._registry[key]
            self.closed = True
        self.disconnect()

    @property
    def connected(self) -> bool:
        client = self._client
        transport = client.get_transport() if client is not None else None
        return transport is not None and transport.is_active()

    def transport(self) -> paramiko.Transport:
        """The live transport, reconnecting (host key checked again) when it dropped."""
        with self._lock:
            if self.closed:
                msg = f"SSH link to {self.settings.address} is closed"
                raise TunnelError(msg)
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                self._client.close()
                self._client = None
                logger.info("SSH connection to %s dropped; reconnecting", self.settings.address)
            if self._failure is not None:
                wait = self._failed_at + _RECONNECT_BACKOFF - time.monotonic()
                if wait > 0:
                    raise type(self._failure)(f"{self._failure} (retrying in {wait:.1f} s)")
            try:
                self._client = _connect_client(self.settings)
            except TunnelError as exc:
                if self._failure is None and self._connected_once:
                    logger.warning("Reconnecting SSH to %s failed: %s", self.settings.address, exc)
                self._failure, self._failed_at = exc, time.monotonic()
                raise
            self._failure = None
            if self._connected_once:
                self.reconnects += 1
                logger.info("SSH connection to %s re-established", self.settings.address)
            self._connected_once = True
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def disconnect(self) -> None:
        """Close the current transport; the next use reconnects unless released."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            transport = client.get_transport()
            client.close()
            if transport is not None and transport is not threading.current_thread():
                transport.join(timeout=2)

    def open_channel(
        self, host: str, port: int, origin: tuple[str, int] = ("127.0.0.1", 0)
    ) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to ``host:port`` as seen from the SSH server."""
        timeout = self.settings.connect_timeout
        for attempt in range(2):
            transport = self.transport()
            try:
                return transport.open_channel("direct-tcpip", (host, port), origin, timeout=timeout)
            except paramiko.ChannelException as exc:
                msg = f"{self.settings.address} cannot connect to {host}:{port}: {exc.text}"
                raise TunnelError(msg) from exc
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if attempt or transport.is_active():
                    msg = f"forwarding to {host}:{port} through {self.settings.address}: {exc}"
                    raise TunnelError(msg) from exc
        raise AssertionError("unreachable")

    def _session(self, timeout: float) -> paramiko.Channel:
        for attempt in range(2):
            transport = self.transport()
            try:
                chan = transport.open_session(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if attempt or transport.is_active():
                    msg = f"opening an SSH session on {self.settings.address}: {exc}"
                    raise TunnelError(msg) from exc
                continue
            chan.settimeout(timeout)
            return chan
        raise AssertionError("unreachable")

    def run(self, command: str, *, timeout: float, stdin: bytes = b"") -> CommandResult:
        """Run ``command`` (already quoted) on the server; the whole call within ``timeout``."""
        deadline = time.monotonic() + timeout
        chan = self._session(timeout)
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            with selectors.DefaultSelector() as sel:
                sel.register(chan, selectors.EVENT_READ)
                while True:
                    if chan.recv_ready():
                        out += chan.recv(_BUFSIZE)
                        continue
                    if chan.recv_stderr_ready():
                        err += chan.recv_stderr(_BUFSIZE)
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    if chan.eof_received or chan.closed:
                        if not chan.status_event.wait(remaining):
                            raise TimeoutError
                        break
                    sel.select(remaining)
        except TimeoutError as exc:
            msg = f"remote command on {self.settings.address} timed out after {timeout:g} s"
            raise TunnelError(msg) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            msg = f"remote command on {self.settings.address} failed: {exc}"
            raise TunnelError(msg) from exc
        finally:
            _close_quietly(chan)
        if chan.exit_status < 0 and not self.connected:
            msg = f"SSH connection to {self.settings.address} was lost during a command"
            raise TunnelError(msg)
        return CommandResult(
            chan.exit_status, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def sh(self, script: str, *, timeout: float) -> CommandResult:
        """Run a POSIX sh ``script`` (values already quoted) on the server.

        Scripts go to one long-lived remote shell per link, each run by its own
        ``/bin/sh -c``: one round trip instead of a new SSH session (and login shell)
        per command. The call, including a restart of that shell, takes at most
        ``timeout`` seconds.
        """
        if not self._shell.unsupported:
            try:
                return self._shell.run(script, timeout)
            except TunnelError:
                if not self._shell.unsupported:
                    raise
        # The server keeps no shell open for us (e.g. a forced command): one session each.
        return self.run("/bin/sh -c " + shlex.quote(script), timeout=timeout)

    @contextlib.contextmanager
    def sftp(self, timeout: float) -> Iterator[paramiko.SFTPClient]:
        """This link's SFTP session, opened once and reused, for one user at a time.

        Every operation times out after ``timeout`` seconds; a failed session is
        dropped and the next use opens a new one.
        """
        with self._sftp_lock:
            client = self._sftp
            if client is None or client.get_channel().closed or not self.connected:
                if client is not None:
                    client.close()
                self._sftp = None
                client = self._sftp = self.open_sftp(timeout)
            client.get_channel().settimeout(timeout)
            try:
                yield client
            except BaseException:
                self._sftp = None
                client.close()
                raise

    def warm_sftp(self, timeout: float) -> None:
        """Open the shared SFTP session ahead of its first use (errors show up then)."""
        errors = (TunnelError, paramiko.SSHException, EOFError, OSError)
        with contextlib.suppress(*errors), self.sftp(timeout):
            pass

    def open_sftp(self, timeout: float) -> paramiko.SFTPClient:
        """An SFTP session whose every operation times out after ``timeout`` seconds."""
        chan = self._session(timeout)
        try:
            chan.invoke_subsystem("sftp")
            return paramiko.SFTPClient(chan)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            _close_quietly(chan)
            msg = f"SFTP on {self.settings.address} failed: {exc}"
            raise TunnelError(msg) from exc


class _RemoteShell:
    """A ``/bin/sh`` kept open on an SSH session, fed one script at a time.

    Each script runs as ``/bin/sh -c <quoted script> </dev/null`` (a syntax error or
    an ``exit`` only ends that child); the shell then prints a random marker and the
    exit status on stdout and the marker on stderr, which delimit the output. A timeout
    or a lost session discards the shell; the next script starts a new one.
    """

    def __init__(self, link: SSHLink) -> None:
        self.link = link
        self._chan: paramiko.Channel | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._lock = threading.Lock()
        #: Set when the server ends the shell at once; scripts then use one session each.
        self.unsupported = False

    def run(self, script: str, timeout: float) -> CommandResult:
        deadline = time.monotonic() + timeout
        where = self.link.settings.address
        with self._lock:
            try:
                if self._chan is None or self._chan.closed or not self.link.connected:
                    self._start(deadline)
                chan = self._chan
                assert chan is not None
                token = secrets.token_hex(12)
                chan.sendall(
                    (
                        f"/bin/sh -c {shlex.quote(script)} </dev/null; "
                        f"printf '\\n{token} %s\\n' \"$?\"; printf '\\n{token}\\n' >&2\n"
                    ).encode()
                )
                out, err, status = self._read(token, deadline)
            except TimeoutError as exc:
                self._discard()
                msg = f"remote command on {where} timed out after {timeout:g} s"
                raise TunnelError(msg) from exc
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self._discard()
                msg = f"remote command on {where} failed: {exc or type(exc).__name__}"
                raise TunnelError(msg) from exc
            except BaseException:
                self._discard()
                raise
        return CommandResult(status, out, err)

    def _start(self, deadline: float) -> None:
        self._discard()
        chan = self.link._session(max(deadline - time.monotonic(), 0.1))
        self._chan = chan
        chan.exec_command("exec /bin/sh")
        # Whatever the login shell's rc files print comes before the first marker.
        token = secrets.token_hex(12)
        chan.sendall(f"printf '\\n{token} 0\\n'; printf '\\n{token}\\n' >&2\n".encode())
        try:
            self._read(token, deadline)
        except EOFError:
            self.unsupported = self.link.connected
            raise

    def _read(self, token: str, deadline: float) -> tuple[str, str, int]:
        """Collect output up to ``token`` on both streams; return stdout, stderr, status."""
        chan = self._chan
        assert chan is not None
        out_mark = f"\n{token} ".encode()
        err_mark = f"\n{token}\n".encode()
        with selectors.DefaultSelector() as sel:
            sel.register(chan, selectors.EVENT_READ)
            while True:
                while chan.recv_ready():
                    self._out += chan.recv(_BUFSIZE)
                while chan.recv_stderr_ready():
                    self._err += chan.recv_stderr(_BUFSIZE)
                at = self._out.find(out_mark)
                end = self._out.find(b"\n", at + len(out_mark)) if at >= 0 else -1
                err_at = self._err.find(err_mark)
                if end >= 0 and err_at >= 0:
                    break
                if chan.closed or chan.eof_received:
                    raise EOFError("the remote shell exited")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sel.select(remaining)
        status = int(self._out[at + len(out_mark) : end] or b"-1")
        out = self._out[:at].decode(errors="replace")
        err = self._err[:err_at].decode(errors="replace")
        del self._out[: end + 1]
        del self._err[: err_at + len(err_mark)]
        return out, err, status

    def _discard(self) -> None:
        chan, self._chan = self._chan, None
        self._out.clear()
        self._err.clear()
        if chan is not None:
            _close_quietly(chan)


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

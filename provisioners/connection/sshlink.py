"""The SSH connection layer on paramiko: checked host keys, no prompts, one shared
transport per server.

A :class:`SSHLink` is one authenticated SSH transport to a server, shared by everything
in this process that uses the same server, user, port, key and host-key policy (the
kernel tunnels of :mod:`provisioners.connection.tunnels`, the SSH target's remote commands and
SFTP). It reconnects on demand: when the transport drops, the next tunnelled connection
or command opens a new one, and the kernels keep running. :meth:`SSHLink.sh` runs
scripts through one long-lived remote shell per link and :meth:`SSHLink.sftp` reuses one
SFTP session.

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
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import secrets
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Iterator
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
    "CommandResult",
    "SSHLink",
    "SSHSettings",
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
#: in :mod:`provisioners.connection.tunnels`.
THREAD_PREFIX = "cluster-ssh"
KEEPALIVE_INTERVAL = 30
#: Read size of remote command output and of tunnel relays.
_BUFSIZE = 65536
#: After a failed (re)connect, further attempts fail at once for this many seconds.
_RECONNECT_BACKOFF = 1.0
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

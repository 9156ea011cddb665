"""One shared, self-healing SSH transport per server: :class:`SSHLink`.

A :class:`SSHLink` is one authenticated SSH transport to a server, shared by everything
in this process that uses the same server, user, port, key and host-key policy (the
kernel tunnels of :mod:`provisioners.connection.tunnels`, the SSH target's remote commands and
SFTP). It reconnects on demand: when the transport drops, the next tunnelled connection
or command opens a new one, and the kernels keep running. :meth:`SSHLink.sh` runs
scripts through one long-lived remote shell per link (:mod:`.sshshell`) and
:meth:`SSHLink.sftp` reuses one SFTP session.

How to reach a server, host keys and the environment knobs are in :mod:`.sshconnect`;
its public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import shlex
import threading
import time
from collections.abc import Iterator
from typing import Any

import paramiko

from ..exceptions import TunnelError
from ..executor import EngineExecutor
from .sshconnect import (
    BUFSIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KNOWN_HOSTS,
    ENV_ACCEPT_UNKNOWN,
    ENV_CONNECT_TIMEOUT,
    ENV_KNOWN_HOSTS,
    KEEPALIVE_INTERVAL,
    THREAD_PREFIX,
    SSHSettings,
    close_quietly,
    connect_client,
    format_server,
    parse_server,
)
from .sshshell import CommandResult, RemoteShell

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KNOWN_HOSTS",
    "ENV_ACCEPT_UNKNOWN",
    "ENV_CONNECT_TIMEOUT",
    "ENV_KNOWN_HOSTS",
    "KEEPALIVE_INTERVAL",
    "SSH_EXECUTOR",
    "THREAD_PREFIX",
    "CommandResult",
    "SSHLink",
    "SSHSettings",
    "format_server",
    "parse_server",
]

logger = logging.getLogger(__name__)
#: After a failed (re)connect, further attempts fail at once for this many seconds.
_RECONNECT_BACKOFF = 1.0
#: The SSH engine's threads: every blocking call on a link from async code (the SSH
#: target's commands and SFTP, every kernel's tunnels) runs here, never in asyncio's
#: default executor, so a frozen host holds SSH threads only.
SSH_EXECUTOR = EngineExecutor("ssh", max_workers=16)


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
        self._shell = RemoteShell(self)
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
                self._client = connect_client(self.settings)
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

    def open_session(self, timeout: float) -> paramiko.Channel:
        """A new session channel whose operations time out after ``timeout`` seconds."""
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
        chan = self.open_session(timeout)
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
                        out += chan.recv(BUFSIZE)
                        continue
                    if chan.recv_stderr_ready():
                        err += chan.recv_stderr(BUFSIZE)
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
            close_quietly(chan)
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
        chan = self.open_session(timeout)
        try:
            chan.invoke_subsystem("sftp")
            return paramiko.SFTPClient(chan)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            close_quietly(chan)
            msg = f"SFTP on {self.settings.address} failed: {exc}"
            raise TunnelError(msg) from exc

"""Remote commands on an :class:`~.sshlink.SSHLink`: their result, and the long-lived
remote shell that runs scripts without a new SSH session each."""

from __future__ import annotations

import secrets
import selectors
import shlex
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paramiko

from ..exceptions import TunnelError
from .sshconnect import BUFSIZE, close_quietly

if TYPE_CHECKING:
    from .sshlink import SSHLink

__all__ = ["CommandResult", "RemoteShell"]


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a remote command."""

    returncode: int
    stdout: str
    stderr: str


class RemoteShell:
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
        chan = self.link.open_session(max(deadline - time.monotonic(), 0.1))
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
                    self._out += chan.recv(BUFSIZE)
                while chan.recv_stderr_ready():
                    self._err += chan.recv_stderr(BUFSIZE)
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
            close_quietly(chan)

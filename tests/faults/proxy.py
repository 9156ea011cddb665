"""A socket relay that a test cuts and restores, to take an engine away under a kernel.

``SocketProxy`` listens on a unix socket path (the Docker daemon's API) or on a TCP port
of 127.0.0.1 (an sshd) and relays every connection to the real endpoint. ``cut()`` drops
every open connection and stops listening (a unix socket path disappears, as it does
while dockerd restarts; a TCP port refuses); ``restore()`` listens again on the same
address. The engine itself is never touched, so other users of it are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from types import TracebackType

_BUFSIZE = 65536


class SocketProxy:
    """Relay ``listen`` (a unix path, or ('127.0.0.1', 0)) to ``target`` (path or (host, port))."""

    def __init__(self, listen: str | tuple[str, int], target: str | tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self.address: str | tuple[str, int] = listen
        self.cuts = 0
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The TCP port listened on (TCP proxies only)."""
        assert isinstance(self.address, tuple)
        return self.address[1]

    def _family(self, address: str | tuple[str, int]) -> socket.AddressFamily:
        return socket.AF_UNIX if isinstance(address, str) else socket.AF_INET

    def start(self) -> SocketProxy:
        """Listen (again) on the same address."""
        server = socket.socket(self._family(self.listen), socket.SOCK_STREAM)
        if isinstance(self.listen, str):
            Path(self.listen).unlink(missing_ok=True)
            server.bind(self.listen)
            os.chmod(self.listen, 0o600)
        else:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(self.address if isinstance(self.address, tuple) else self.listen)
            self.address = server.getsockname()
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    restore = start

    def cut(self) -> None:
        """Drop every relayed connection and stop listening (the engine is 'gone')."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if isinstance(self.listen, str):
            Path(self.listen).unlink(missing_ok=True)
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.cuts += 1

    stop = cut

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = _connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            pair = [2]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: list[int]) -> None:
        """Copy until EOF; the second pump of a pair to end closes both sockets."""
        try:
            while data := source.recv(_BUFSIZE):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with self._lock:
            pair[0] -= 1
            last = pair[0] == 0
            if last:
                self._conns -= {source, sink}
        if last:
            source.close()
            sink.close()

    def __enter__(self) -> SocketProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cut()


def _connect(target: str | tuple[str, int]) -> socket.socket:
    if isinstance(target, tuple):
        sock = socket.create_connection(target, timeout=5)
        sock.settimeout(None)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock

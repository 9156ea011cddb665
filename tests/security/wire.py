"""A TCP relay that records every byte passing between a client and a kernel's port,
and a kernel's code run with all its channels recorded."""

from __future__ import annotations

import contextlib
import socket
import threading
from contextlib import ExitStack
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from provisioners.connection.files import PORT_NAMES
from tests.helpers import execute

#: Kernelspec metadata of a kernel that supports CurveZMQ.
CURVE = {"supported_encryption": ["curve"]}


class WireRecorder:
    """Listens on 127.0.0.1, relays each connection to ``(host, port)``, keeps the bytes.

    Put it between a kernel client and one of the kernel's channels (point the client at
    :attr:`port`): :meth:`recorded` is then all that crossed the wire, both ways.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._bytes = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def recorded(self) -> bytes:
        with self._lock:
            return bytes(self._bytes)

    def close(self) -> None:
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> WireRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                kernel = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()  # not up yet: the ZMQ client reconnects
                continue
            kernel.settimeout(None)
            self._sockets += [client, kernel]
            for src, dst in ((client, kernel), (kernel, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self._bytes += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


async def execute_recorded(km: AsyncKernelManager, code: str) -> tuple[dict[str, Any], bytes]:
    """Run ``code`` with every channel relayed through recorders; output and wire bytes."""
    info = km.get_connection_info()
    with ExitStack() as stack:
        relays = {
            name: stack.enter_context(WireRecorder(str(info["ip"]), int(info[name])))
            for name in PORT_NAMES
        }
        # a client of the manager (it judges liveness), pointed at the recorders
        kc = km.client(ip="127.0.0.1", **{n: r.port for n, r in relays.items()})
        out = await execute(kc, code)
        wire = relays["shell_port"].recorded() + relays["iopub_port"].recorded()
    return out, wire

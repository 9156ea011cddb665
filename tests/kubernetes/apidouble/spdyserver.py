"""The double's SPDY/3.1 port-forward: what the API server and the kubelet do behind a
``POST .../pods/NAME/portforward`` with ``Upgrade: SPDY/3.1``.

After the 101 the connection carries SPDY/3.1 frames. The client opens streams with
SYN_STREAM; each names its ``streamtype`` (``error`` or ``data``), ``port`` and
``requestid`` in a zlib-compressed header block. Once both streams of a request id are
open the double connects to the port inside the pod, as the kubelet does: a refused
connection is reported as text on the error stream, then both streams are closed
(FIN); else pod bytes go out as DATA frames on the data stream and the client's DATA
goes to the pod. A FIN from the client half-closes the pod connection (the pod's
answer still comes, as on a real node); the pod closing its connection closes both
streams. RST_STREAM
from the client drops its stream. The server sends a PING at the start of each
connection (the client must echo it) and replies to every stream with SYN_REPLY.

Strictness, to catch a client the real kubelet would reject or mistreat: header names
must be lowercase and unique (the Go framer rejects others: the connection is closed
with GOAWAY); DATA after the client's FIN, or on a stream it never opened, and stream
ids not odd and increasing are recorded in :attr:`SpdyStats.violations`. Header blocks
compressed with SPDY's dictionary (FDICT set) are not understood here (the double has
no copy of it): GOAWAY. The client's WINDOW_UPDATEs are counted, not enforced.

:func:`stats` gives a cluster's counters: connections opened and open, per pod, for
tests that count connections to the API server; :func:`drop_all` cuts every open
connection (an API server restart, as a client sees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FIN = 0x01
PROTOCOL_ERROR, INVALID_STREAM, CANCEL, STREAM_ALREADY_CLOSED = 1, 2, 5, 9
PROTOCOL = "portforward.k8s.io"


@dataclass
class SpdyStats:
    """What the double's SPDY port-forwards did, for tests."""

    opened: dict[str, int] = field(default_factory=dict)  # pod -> connections opened
    sessions: set[SpdyServer] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    pings_echoed: int = 0
    window_updates: int = 0
    pairs: int = 0
    websockets: int = 0  # websocket port-forwards (the fallback), for comparison
    #: Answer the upgrade with 400 "Upgrade request required", as a server or proxy that
    #: knows only websockets does (the client must fall back to websockets).
    refuse_upgrade: bool = False

    def open_connections(self, pod: str | None = None) -> int:
        """Connections open now (to ``pod``, or to any pod)."""
        return sum(1 for s in self.sessions if pod is None or s.pod == pod)

    def open_streams(self) -> int:
        """Streams open now, over every connection."""
        return sum(len(s.streams) for s in self.sessions)


_STATS: weakref.WeakKeyDictionary[Any, SpdyStats] = weakref.WeakKeyDictionary()


def stats(cluster: Any) -> SpdyStats:
    """``cluster``'s SPDY counters (made on first use)."""
    found = _STATS.get(cluster)
    if found is None:
        found = _STATS[cluster] = SpdyStats()
    return found


def drop_all(cluster: Any) -> int:
    """Cut every open SPDY connection of ``cluster`` at once (call on the double's loop);
    returns how many."""
    sessions = list(stats(cluster).sessions)
    for session in sessions:
        if session.transport is not None:
            session.transport.abort()
    return len(sessions)


def is_spdy_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").strip().lower() == "spdy/3.1"


async def serve(request: web.Request, cluster: Any, pod: str, sandbox: Any) -> web.StreamResponse:
    """Answer the upgrade with 101 and serve SPDY on the request's connection until it
    ends. Refuses (403, as the kubelet's handshake) a client that does not offer the
    port-forward protocol."""
    offered = [
        p.strip()
        for value in request.headers.getall("X-Stream-Protocol-Version", [])
        for p in value.split(",")
    ]
    if PROTOCOL not in offered:
        raise web.HTTPForbidden(
            text=f"unable to upgrade: unable to negotiate protocol: client supports "
            f"{offered}, server accepts [{PROTOCOL!r}]"
        )
    transport = request.transport
    assert transport is not None
    session = SpdyServer(cluster, pod, sandbox)
    transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        b"X-Stream-Protocol-Version: " + PROTOCOL.encode() + b"\r\n\r\n"
    )
    transport.set_protocol(session)  # type: ignore[arg-type]
    session.connection_made(transport)
    try:
        await session.done
    finally:
        session.close()
    # the connection is SPDY's now: aiohttp finds it closed and writes nothing
    return web.Response(status=101)


class _Pair:
    """The streams of one request id and the pod connection behind them."""

    def __init__(self) -> None:
        self.data = 0
        self.error = 0
        self.port = 0
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []
        self.client_fin = False
        self.ended = False


class SpdyServer(asyncio.Protocol):
    """The server end of one SPDY port-forward connection to ``pod``."""

    def __init__(self, cluster: Any, pod: str, sandbox: Any) -> None:
        self.cluster = cluster
        self.pod = pod
        self.sandbox = sandbox
        self.stats = stats(cluster)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams: dict[int, _Pair] = {}  # open stream id -> its pair
        self.client_closed: set[int] = set()  # streams the client sent FIN on
        self.pairs: dict[str, _Pair] = {}
        self._buf = bytearray()
        self._inflate = zlib.decompressobj()
        self._deflate = zlib.compressobj()
        self._last_id = 0
        self._ping = 2
        self._first_block = True

    # ---------------------------------------------------------------- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.sessions.add(self)
        self.stats.opened[self.pod] = self.stats.opened.get(self.pod, 0) + 1
        self._control(PING, 0, struct.pack(">I", self._ping))

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.sessions.discard(self)
        for pair in self.pairs.values():
            self._end_pair(pair, send=False)
        self.streams.clear()
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 8:
            word, length = struct.unpack_from(">II", self._buf)
            flags, length = length >> 24, length & 0xFFFFFF
            if len(self._buf) < 8 + length:
                return
            payload = bytes(self._buf[8 : 8 + length])
            del self._buf[: 8 + length]
            if word & 0x80000000:
                if (word >> 16) & 0x7FFF != 3:
                    self._goaway(f"SPDY version {(word >> 16) & 0x7FFF}, not 3")
                    return
                self._on_control(word & 0xFFFF, flags, payload)
            else:
                self._on_data(word & 0x7FFFFFFF, flags, payload)
            if self.transport is None or self.transport.is_closing():
                return

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---------------------------------------------------------------- frames out
    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        self._write(struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(payload)) + payload)

    def _data(self, stream_id: int, payload: bytes, fin: bool = False) -> None:
        header = struct.pack(">II", stream_id, ((FIN if fin else 0) << 24) | len(payload))
        self._write(header + payload)

    def _goaway(self, why: str) -> None:
        self.stats.violations.append(f"{self.pod}: {why}")
        log.warning("k8s double SPDY: %s; GOAWAY", why)
        self._control(GOAWAY, 0, struct.pack(">II", self._last_id, PROTOCOL_ERROR))
        self.close()

    # ---------------------------------------------------------------- frames in
    def _on_control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            self._on_syn(flags, payload)
        elif kind == PING:
            if payload == struct.pack(">I", self._ping):
                self.stats.pings_echoed += 1
            else:
                self._control(PING, 0, payload)
        elif kind == RST_STREAM:
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            pair = self.streams.pop(stream_id, None)
            if pair is not None:
                self._end_pair(pair)
        elif kind == WINDOW_UPDATE:
            self.stats.window_updates += 1
        elif kind == GOAWAY:
            self.close()

    def _on_syn(self, flags: int, payload: bytes) -> None:
        stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
        if stream_id % 2 == 0 or stream_id <= self._last_id:
            self.stats.violations.append(f"{self.pod}: stream id {stream_id} after {self._last_id}")
        self._last_id = stream_id
        block = payload[10:]
        if self._first_block and len(block) >= 2 and block[1] & 0x20:
            self._goaway("header block compressed with the SPDY dictionary")
            return
        self._first_block = False
        try:
            headers = _parse_headers(self._inflate.decompress(block))
        except ValueError as exc:
            self._goaway(str(exc))
            return
        self._control(SYN_REPLY, 0, struct.pack(">I", stream_id) + self._empty_block())
        kind, request = headers.get("streamtype", ""), headers.get("requestid", "")
        if kind not in ("data", "error") or not request:
            self.stats.violations.append(f"{self.pod}: stream {stream_id} headers {headers}")
            self._control(RST_STREAM, 0, struct.pack(">II", stream_id, PROTOCOL_ERROR))
            return
        pair = self.pairs.setdefault(request, _Pair())
        setattr(pair, kind, stream_id)
        self.streams[stream_id] = pair
        if flags & FIN:
            self.client_closed.add(stream_id)
        try:
            pair.port = int(headers.get("port", ""))
        except ValueError:
            pair.port = 0
        if pair.data and pair.error and pair.task is None and not pair.ended:
            self.stats.pairs += 1
            pair.task = asyncio.create_task(self._forward(request, pair))

    def _empty_block(self) -> bytes:
        return self._deflate.compress(struct.pack(">I", 0)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        pair = self.streams.get(stream_id)
        if pair is None:
            if stream_id > self._last_id:
                self.stats.violations.append(f"{self.pod}: DATA on unopened stream {stream_id}")
            return
        if stream_id in self.client_closed and (payload or flags & FIN):
            self.stats.violations.append(f"{self.pod}: DATA after FIN on stream {stream_id}")
            return
        if stream_id == pair.error:
            if payload:
                self.stats.violations.append(f"{self.pod}: DATA on error stream {stream_id}")
        elif payload:
            if pair.writer is not None:
                pair.writer.write(payload)
            else:
                pair.pending.append(payload)
        if flags & FIN:
            self.client_closed.add(stream_id)
            if stream_id == pair.data:
                pair.client_fin = True
                if pair.writer is not None:  # half-closed: the pod's answer still comes
                    _write_eof(pair.writer)

    # ---------------------------------------------------------------- the kubelet's side
    async def _forward(self, request: str, pair: _Pair) -> None:
        from .streams import _connect

        try:
            reader, writer = await _connect(self.sandbox, pair.port)
        except ConnectionError as exc:
            text = f"error forwarding port {pair.port} to pod {self.sandbox.id}, uid : {exc}"
            self._data(pair.error, text.encode())
            self._end_pair(pair)
            return
        except asyncio.CancelledError:
            return
        pair.writer = writer
        for chunk in pair.pending:
            writer.write(chunk)
        pair.pending.clear()
        if pair.client_fin:
            _write_eof(writer)
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                self._data(pair.data, data)
        self._end_pair(pair)

    def _end_pair(self, pair: _Pair, send: bool = True) -> None:
        """Close the pod connection and FIN both streams (once)."""
        if pair.writer is not None:
            pair.writer.close()
            pair.writer = None
        pair.ended = True
        task = pair.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        for stream_id in (pair.error, pair.data):
            if stream_id in self.streams:
                del self.streams[stream_id]
                if send:
                    self._data(stream_id, b"", fin=True)
        self.pairs = {k: v for k, v in self.pairs.items() if v is not pair}


def _write_eof(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


def _parse_headers(block: bytes) -> dict[str, str]:
    """A SPDY/3 name/value block; ValueError for what the Go framer refuses."""
    if len(block) < 4:
        raise ValueError("header block too short")
    (count,) = struct.unpack_from(">I", block)
    offset, headers = 4, {}
    for _ in range(count):
        (size,) = struct.unpack_from(">I", block, offset)
        name = block[offset + 4 : offset + 4 + size].decode()
        offset += 4 + size
        (size,) = struct.unpack_from(">I", block, offset)
        value = block[offset + 4 : offset + 4 + size].decode()
        offset += 4 + size
        if name != name.lower():
            raise ValueError(f"header name {name!r} is not lowercase")
        if name in headers:
            raise ValueError(f"header {name!r} twice")
        headers[name] = value
    return headers

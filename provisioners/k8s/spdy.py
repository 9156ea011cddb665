"""A SPDY/3.1 client session for the API server's streaming subresources (port-forward).

The API server upgrades ``POST .../pods/NAME/portforward`` (``Connection: Upgrade``,
``Upgrade: SPDY/3.1``, ``X-Stream-Protocol-Version: portforward.k8s.io``) with a 101 and
from then on relays SPDY/3.1 frames between this client and the kubelet. One such
connection carries any number of streams, each opened by the client with a SYN_STREAM
whose headers name it; the kubelet pairs streams by their ``requestid`` header.

What this client does and does not do of SPDY/3.1 (the frame layout is the spec's):

- Header blocks it sends are zlib streams (one per connection, sync-flushed per frame)
  compressed *without* the SPDY dictionary: the zlib header has no FDICT bit, and a Go
  reader (the kubelet's) then reads them without one. Header names are lowercase, as the
  Go framer demands.
- Header blocks it receives (SYN_REPLY, HEADERS) are skipped, never inflated: their
  length is in the frame, and no reply header matters to a port-forward.
- PINGs from the server are echoed; GOAWAY stops new streams on this connection (open
  ones run on); RST_STREAM ends a stream at once; SETTINGS and unknown frames are
  ignored.
- Flow control: received data is acknowledged with WINDOW_UPDATE (per stream and for the
  connection) once 32 KiB have been consumed; the peer's windows are not enforced on
  what this client sends (the kubelet's spdystream does not do flow control).

Errors: :func:`connect` raises :class:`~.client.KubeApiError` when the server cannot be
reached or answers 401, 403 or 404 (the API's own Status message), and
:class:`SpdyRefused` for any other answer than the upgrade (a server, proxy or version
that does not speak SPDY here, or a pod that cannot be forwarded to: the caller tells
them apart). Once connected nothing raises: a lost connection ends every stream
(:attr:`SpdyStream.ended`), and :meth:`SpdySession.open_pair` on a closed session raises
:class:`SessionClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import urllib.request
import weakref
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..exceptions import TunnelError
from .client import KubeApiError, KubeClient, counted

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FLAG_FIN = 0x01
#: RST_STREAM status codes used here.
PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 1, 3, 5
#: Bytes consumed before a WINDOW_UPDATE is sent (half SPDY's initial 64 KiB window).
_WINDOW_STEP = 32 * 1024
_MAX_FRAME = 0xFFFFFF
_MAX_HEAD = 64 * 1024
PORTFORWARD_PROTOCOL = "portforward.k8s.io"


class SpdyRefused(TunnelError):
    """The server answered the SPDY upgrade with something else than 101."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, target="kubernetes")
        self.status = status


class SessionClosed(TunnelError):
    """The SPDY connection is gone (or going away): open a new one."""


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    """A SPDY/3 control frame of type ``kind``."""
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    """A DATA frame of ``stream_id`` (``payload`` at most 16 MiB - 1)."""
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


class HeaderEncoder:
    """Compresses this side's header blocks: one zlib stream per connection, no dictionary."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(6, zlib.DEFLATED, 15)

    def encode(self, headers: Mapping[str, str]) -> bytes:
        block = bytearray(struct.pack(">I", len(headers)))
        for name, value in headers.items():
            key, val = name.lower().encode(), str(value).encode()
            block += struct.pack(">I", len(key)) + key + struct.pack(">I", len(val)) + val
        return self._zlib.compress(bytes(block)) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class SpdyStream:
    """One stream of a :class:`SpdySession`, opened by this client.

    Data the server sends is buffered until :meth:`attach` names a sink, then handed to
    it as it arrives (in the event loop's reading callback: the sink must not block).
    :attr:`ended` resolves when the server is done with it: FIN (True) or RST_STREAM or
    a lost connection (False).
    """

    def __init__(self, session: SpdySession, stream_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.buffer = bytearray()
        self.sink: Callable[[bytes], object] | None = None
        self.ended: asyncio.Future[bool] = session.loop.create_future()
        self.sent_fin = False
        self._arrived: asyncio.Future[None] | None = None
        self._unacked = 0

    def attach(self, sink: Callable[[bytes], object]) -> None:
        """Hand data to ``sink`` from now on (what is buffered first)."""
        if self.buffer:
            data, self.buffer = bytes(self.buffer), bytearray()
            sink(data)
        self.sink = sink

    async def wait_data(self, timeout: float) -> None:
        """Return once data is buffered or the stream ended; TimeoutError after ``timeout``."""
        if self.buffer or self.ended.done():
            return
        self._arrived = self.session.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._arrived), timeout)
        finally:
            self._arrived = None

    def send(self, data: bytes) -> None:
        """Send ``data`` (no-op once this side sent FIN or the connection is gone)."""
        if not self.sent_fin:
            self.session.send_data(self.id, data)

    def close_write(self) -> None:
        """Send FIN: this side sends nothing more."""
        if not self.sent_fin:
            self.sent_fin = True
            self.session.send_data(self.id, b"", fin=True)
            if self.ended.done():
                self.session._forget(self.id)

    def reset(self, status: int = CANCEL) -> None:
        """End the stream both ways now (RST_STREAM unless the server is done with it and
        this side sent FIN: then it is over already)."""
        if not (self.sent_fin and self.ended.done()):
            self.session.send_reset(self.id, status)
        self.sent_fin = True
        self._end(False)
        self.session._forget(self.id)

    # called by the session
    def _deliver(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            self.buffer += data
            self._wake()
        self._unacked += len(data)
        if self._unacked >= _WINDOW_STEP:
            self.session.acknowledge(self.id, self._unacked)
            self._unacked = 0

    def _end(self, clean: bool) -> None:
        if not self.ended.done():
            self.ended.set_result(clean)
        self._wake()
        if self.sent_fin:
            self.session._forget(self.id)

    def _wake(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)


class SpdySession(asyncio.Protocol):
    """The client end of one upgraded connection: an HTTP/1.1 upgrade, then SPDY/3.1 frames.

    Make one with :func:`connect`. :meth:`open_pair` opens the two streams of a
    port-forward; :attr:`closed` resolves when the connection is gone. Everything runs
    on the loop that made it; writes never block (:meth:`drain` waits while the
    transport's buffer is full).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.going_away = False
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.streams: dict[int, SpdyStream] = {}
        self._head = bytearray()
        self._in_http = True
        self._buf = bytearray()
        self._next_id = 1
        self._next_request = 0
        self._encoder = HeaderEncoder()
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._status = 0
        self._expect = 0
        self._unacked = 0

    # --------------------------------------------------------------- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.going_away = True
        if not self.upgraded.done():
            self._refused_now()
        for stream in list(self.streams.values()):
            stream.sent_fin = True
            stream._end(False)
        self.streams.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._in_http:
            self._head += data
            self._read_head()
            return
        self._buf += data
        self._read_frames()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost ends every stream

    # --------------------------------------------------------------- the HTTP upgrade
    def _read_head(self) -> None:
        if self._status == 0:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    self._refuse(0, "the upgrade's answer has no end of headers")
                return
            head, rest = bytes(self._head[:end]).decode("latin-1"), self._head[end + 4 :]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            try:
                self._status = int(parts[1])
            except (IndexError, ValueError):
                self._refuse(0, f"not an HTTP answer: {lines[0][:80]!r}")
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if self._status == 101:
                if headers.get("upgrade", "").lower() != "spdy/3.1":
                    self._refuse(101, f"upgraded to {headers.get('upgrade')!r}, not SPDY/3.1")
                    return
                self._in_http = False
                self._head = bytearray()
                self.upgraded.set_result(None)
                if rest:
                    self._buf += rest
                    self._read_frames()
                return
            self._expect = int(headers.get("content-length") or _MAX_HEAD)
            self._head = bytearray(rest)
        if len(self._head) >= min(self._expect, _MAX_HEAD):
            self._refused_now()

    def _refused_now(self) -> None:
        body = bytes(self._head[: self._expect or _MAX_HEAD])
        self._refuse(self._status, body.decode(errors="replace"))

    def _refuse(self, status: int, body: str) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(_refusal(status, body))
        if self.transport is not None:
            self.transport.close()

    # --------------------------------------------------------------- frames in
    def _read_frames(self) -> None:
        buf = self._buf
        offset = 0
        while len(buf) - offset >= 8:
            word, length = struct.unpack_from(">II", buf, offset)
            flags, length = length >> 24, length & 0xFFFFFF
            if len(buf) - offset < 8 + length:
                break
            payload = bytes(buf[offset + 8 : offset + 8 + length])
            offset += 8 + length
            if word & 0x80000000:
                self._control(word & 0xFFFF, flags, payload)
            else:
                self._data(word & 0x7FFFFFFF, flags, payload)
            if self.transport is None or self.transport.is_closing():
                break
        del buf[:offset]

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if payload:
            stream._deliver(payload)
            self._unacked += len(payload)
            if self._unacked >= _WINDOW_STEP:
                self.acknowledge(0, self._unacked)
                self._unacked = 0
        if flags & FLAG_FIN:
            stream._end(True)

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == PING and len(payload) == 4:
            (ping_id,) = struct.unpack(">I", payload)
            if ping_id % 2 == 0:  # the server's: echo it (odd ones answer ours)
                self._write(control_frame(PING, 0, payload))
        elif kind in (SYN_REPLY, HEADERS) and len(payload) >= 4:
            if flags & FLAG_FIN:  # the header block itself is skipped, never inflated
                stream = self.streams.get(struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF)
                if stream is not None:
                    stream._end(True)
        elif kind == RST_STREAM and len(payload) >= 8:
            stream_id, status = struct.unpack_from(">II", payload)
            stream = self.streams.get(stream_id & 0x7FFFFFFF)
            if stream is not None:
                log.debug("SPDY stream %s reset by the server (status %s)", stream.id, status)
                stream.sent_fin = True
                stream._end(False)
        elif kind == GOAWAY:
            self.going_away = True
        elif kind == SYN_STREAM and len(payload) >= 4:  # no server streams in a port-forward
            self.send_reset(struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF, REFUSED_STREAM)

    # --------------------------------------------------------------- frames out
    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def send_data(self, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        view = memoryview(data)
        while len(view) > _MAX_FRAME:
            self._write(data_frame(stream_id, 0, bytes(view[:_MAX_FRAME])))
            view = view[_MAX_FRAME:]
        self._write(data_frame(stream_id, FLAG_FIN if fin else 0, bytes(view)))

    def send_reset(self, stream_id: int, status: int = CANCEL) -> None:
        self._write(control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status)))

    def acknowledge(self, stream_id: int, size: int) -> None:
        """WINDOW_UPDATE: ``size`` bytes of ``stream_id`` (0: of the connection) consumed."""
        self._write(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, size)))

    def open_stream(self, headers: Mapping[str, str], *, fin: bool = False) -> SpdyStream:
        """Open a stream (SYN_STREAM with ``headers``; ``fin``: this side sends nothing)."""
        if self.going_away or self.transport is None or self.transport.is_closing():
            msg = "the SPDY connection is closed"
            raise SessionClosed(msg, target="kubernetes")
        stream_id, self._next_id = self._next_id, self._next_id + 2
        if stream_id > 0x7FFFFFFF:
            self.going_away = True
            msg = "the SPDY connection ran out of stream ids"
            raise SessionClosed(msg, target="kubernetes")
        stream = SpdyStream(self, stream_id)
        stream.sent_fin = fin
        self.streams[stream_id] = stream
        block = self._encoder.encode(headers)
        # stream id, associated stream id, priority (3 bits) + unused + slot
        payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
        self._write(control_frame(SYN_STREAM, FLAG_FIN if fin else 0, payload))
        return stream

    def open_pair(self, port: int) -> tuple[SpdyStream, SpdyStream]:
        """The (data, error) streams of one forwarded connection to ``port`` of the pod,
        as kubectl opens them: error first, which this side never writes to."""
        self._next_request += 1
        headers = {"streamtype": "error", "port": str(port), "requestid": str(self._next_request)}
        error = self.open_stream(headers, fin=True)
        data = self.open_stream({**headers, "streamtype": "data"})
        return data, error

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    @property
    def write_paused(self) -> bool:
        return self._paused

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        while self._paused and not self.closed.done():
            if self._drained is None or self._drained.done():
                self._drained = self.loop.create_future()
            await asyncio.shield(self._drained)

    def close(self) -> None:
        """GOAWAY, then close the connection: every stream ends."""
        if self.transport is not None and not self.transport.is_closing():
            if not self._in_http:
                last = max(0, self._next_id - 2)
                self._write(control_frame(GOAWAY, 0, struct.pack(">II", last, 0)))
            self.transport.close()
        self.going_away = True

    async def aclose(self, timeout: float = 2.0) -> None:
        """:meth:`close`, and wait (up to ``timeout``) until the connection is gone."""
        self.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        if not self.closed.done() and self.transport is not None:
            self.transport.abort()


def _refusal(status: int, body: str) -> Exception:
    """What a non-upgrade answer means: a :class:`KubeApiError` for the ones the websocket
    path would get too (401, 403, 404) and for none at all, else :class:`SpdyRefused`."""
    if not status and not body:
        return KubeApiError(0, "Unreachable", "SPDY upgrade: the connection closed unanswered")
    message = f"SPDY upgrade: HTTP {status}" if status else f"SPDY upgrade: {body}"
    if status in (401, 403, 404):
        return KubeApiError.from_body(status, body.encode(), message)
    if status:
        with contextlib.suppress(Exception):
            error = KubeApiError.from_body(status, body.encode(), message)
            message = str(error)
    return SpdyRefused(status, message)


# -------------------------------------------------------------------------- connecting

_SSL: weakref.WeakKeyDictionary[Any, ssl.SSLContext] = weakref.WeakKeyDictionary()


def _ssl_context(cfg: Any) -> ssl.SSLContext:
    """The TLS context kubernetes_asyncio's own client uses for ``cfg`` (blocking: reads
    the CA and client certificate files)."""
    context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
    if not cfg.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if getattr(cfg, "disable_strict_ssl_verification", False):
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def proxied(client: KubeClient) -> bool:
    """Whether requests to the API server go through an HTTP proxy (the kubeconfig's, or
    the environment's, which the websocket client honours): this module does not."""
    cfg = client.api.configuration
    if cfg.proxy:
        return True
    url = urlsplit(cfg.host or "")
    proxies = urllib.request.getproxies()
    if not proxies.get(url.scheme or "https"):
        return False
    return not urllib.request.proxy_bypass(url.hostname or "")


async def connect(
    client: KubeClient,
    path: str,
    query: list[tuple[str, str]] | None = None,
    *,
    protocol: str = PORTFORWARD_PROTOCOL,
    timeout: float = 10.0,
    executor: Any = None,
) -> SpdySession:
    """Upgrade ``POST path`` to SPDY/3.1 with ``client``'s credentials and TLS settings.

    Raises :class:`KubeApiError` (unreachable, timeout, 401/403/404, counted in the
    engine errors metric) or :class:`SpdyRefused` (any other answer); nothing stays open.
    """
    loop = asyncio.get_running_loop()
    cfg = client.api.configuration
    url = urlsplit((cfg.host or "").rstrip("/"))
    secure = url.scheme == "https"
    host = url.hostname or "localhost"
    port = url.port or (443 if secure else 80)
    context: ssl.SSLContext | None = None
    if secure:
        context = _SSL.get(cfg)
        if context is None:
            context = await loop.run_in_executor(executor, _ssl_context, cfg)
            _SSL[cfg] = context
    headers: dict[str, str] = {}
    await client.api.update_params_for_auth(headers, [], ["BearerToken"])
    if cfg.username and "authorization" not in {k.lower() for k in headers}:
        headers["Authorization"] = cfg.get_basic_auth_token()
    target = (url.path.rstrip("/") + path) + (("?" + urlencode(query)) if query else "")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {url.netloc}",
        "Connection: Upgrade",
        "Upgrade: SPDY/3.1",
        f"X-Stream-Protocol-Version: {protocol}",
        "Content-Length: 0",
        "User-Agent: cluster-provisioners",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    session = SpdySession(loop)
    what = f"SPDY {path}"

    async def upgrade() -> None:
        await loop.create_connection(
            lambda: session,
            host,
            port,
            ssl=context,
            server_hostname=(cfg.tls_server_name or host) if secure else None,
        )
        assert session.transport is not None
        session.transport.write(request)
        await session.upgraded

    try:
        await asyncio.wait_for(upgrade(), timeout)
    except asyncio.TimeoutError as exc:
        session.close()
        raise counted(KubeApiError(0, "Timeout", f"{what}: no answer in {timeout:g} s")) from exc
    except (OSError, ssl.SSLError) as exc:
        session.close()
        error = KubeApiError(0, "Unreachable", f"{what}: {type(exc).__name__}: {exc}")
        raise counted(error) from exc
    except KubeApiError as exc:
        session.close()
        raise counted(exc) from None
    except BaseException:
        session.close()
        raise
    return session

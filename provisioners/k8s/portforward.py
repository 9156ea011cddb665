"""Reaching into a pod through the API server: port-forward and exec.

Port-forward, the default way (``protocol='spdy'``): one SPDY/3.1 connection per pod
(``POST .../pods/NAME/portforward`` upgraded, see :mod:`.spdy`), opened once and shared
by every local connection to the kernel. Each local connection is a pair of streams on
it, as kubectl opens them (an error stream, then a data stream, with the same
``requestid`` and ``port``); closing the local connection sends FIN on its data stream,
which closes the kubelet's connection to the kernel. The connection is opened at the
first need (the start's readiness probe) and again after it is lost (an API server
restart, a dropped TCP connection): the next local connection (ZMQ reconnects by
itself) opens a fresh one. A retarget (a restarted kernel's new pod) closes the old
pod's connection and its streams.

The websocket way (``protocol='websocket'``, and the fallback when the API server, a
proxy in between or an HTTP proxy in the kubeconfig or environment refuses the SPDY
upgrade; said once in the log): ``GET .../pods/NAME/portforward?ports=P``, subprotocol
``v4.channel.k8s.io`` (which kubelets also accept as ``portforward.k8s.io``): every
frame starts with a channel byte; for the i-th requested port, channel ``2i`` carries
data both ways and channel ``2i+1`` carries error text from the server; the server's
first frame on each channel starts with the port number as two little-endian bytes.
One websocket carries one TCP connection (the protocol cannot close one stream alone),
so that way opens one websocket per local connection.

Exec (``.../pods/NAME/exec``, ``v4.channel.k8s.io``): channels 1 and 2 are stdout and
stderr, channel 3 carries the final ``Status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..connection.relay import LocalRelay
from ..exceptions import TunnelError
from . import spdy
from .client import KubeApiError, KubeClient, NotFound, resource_path
from .loop import KUBERNETES_EXECUTOR

#: Offered in this order; the server picks the first it speaks.
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "portforward.k8s.io")
EXEC_PROTOCOLS = ("v4.channel.k8s.io",)
#: The transports of a port-forward (the first is the default).
TRANSPORTS = ("spdy", "websocket")
_CHUNK = 256 * 1024
#: Seconds between two tries to reach a kernel that does not listen yet.
_RETRY = 0.05
#: Seconds a closed local connection waits for the pod's side to end before a reset.
_LINGER = 2.0
BINARY = aiohttp.WSMsgType.BINARY

log = logging.getLogger(__name__)

#: API servers (their URL) that refused the SPDY upgrade in this process: their
#: port-forwards use websockets from then on.
_NO_SPDY: set[str] = set()


class PortForwarder(LocalRelay):
    """Local TCP listeners forwarding each connection to a pod port through the API server.

    ``local_ports`` are the ports to listen on (0, or a port that cannot be bound, takes
    one from the cluster port cache: :attr:`local_ports` tells which were used). Use it
    as an async context manager or through :meth:`start` / :meth:`stop`.

    ``protocol`` is ``'spdy'`` (one connection per pod for every local connection;
    websockets when the API server refuses the upgrade) or ``'websocket'`` (one per
    local connection). Errors: :meth:`start` raises :class:`TunnelError` when a listener
    cannot be opened; :meth:`probe` raises :class:`KubeApiError` when the API refuses
    (401, 403, an unreachable server...); a forwarded connection that cannot be made or
    breaks is closed (logged: a warning once per pod and status for a refusal, else at
    debug level), and the client's next one tries again.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        pod: str,
        remote_ports: Sequence[int],
        local_ports: Sequence[int] | None = None,
        *,
        host: str = "127.0.0.1",
        connect_timeout: float = 10.0,
        owner: str = "",
        protocol: str = "spdy",
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.remote_ports = [int(p) for p in remote_ports]
        wanted = list(local_ports) if local_ports is not None else [0] * len(self.remote_ports)
        if len(wanted) != len(self.remote_ports):
            msg = "local_ports and remote_ports differ in length"
            raise ValueError(msg)
        if protocol not in TRANSPORTS:
            msg = f"protocol must be one of {TRANSPORTS}, not {protocol!r}"
            raise ValueError(msg)
        super().__init__(
            wanted,
            executor=KUBERNETES_EXECUTOR,
            host=host,
            owner=owner,
            what="the port-forward",
            logger=logger or log,
        )
        self.client = client
        self.namespace = namespace
        self.pod = pod
        self.connect_timeout = connect_timeout
        self.protocol = protocol
        self._warned: set[tuple[str, int]] = set()
        self._spares: dict[int, asyncio.Task[aiohttp.ClientWebSocketResponse]] = {}
        self._pairs: dict[int, tuple[spdy.SpdyStream, spdy.SpdyStream]] = {}
        self._session: spdy.SpdySession | None = None
        #: Connections the server is ending (GOAWAY): no new streams, open ones run on.
        self._retired: set[spdy.SpdySession] = set()
        self._session_pod = ""
        self._opening: asyncio.Task[spdy.SpdySession] | None = None
        #: SPDY connections opened so far (one per pod, plus one per reconnection).
        self.connections_opened = 0
        server = self._server
        if protocol == "spdy" and server not in _NO_SPDY and spdy.proxied(client):
            _NO_SPDY.add(server)
            self.log.warning(
                "The API server %s is reached through an HTTP proxy: port-forwards use one "
                "websocket per connection (the SPDY transport does not go through proxies)",
                server,
            )

    @property
    def path(self) -> str:
        return resource_path("pods", self.namespace, self.pod, "portforward")

    @property
    def transport(self) -> str:
        """The transport new connections use: 'spdy' or 'websocket'."""
        if self.protocol == "websocket" or self._server in _NO_SPDY:
            return "websocket"
        return "spdy"

    @property
    def _server(self) -> str:
        return str(self.client.api.configuration.host or "")

    def retarget(self, pod: str) -> None:
        """Send new connections to pod ``pod``: a websocket's open connections keep
        going, a SPDY connection to the old pod is closed with its streams."""
        if pod != self.pod:
            self._drop_spares()
            self._drop_session()
        self.pod = pod

    async def start(self) -> list[int]:
        """Open the listeners; return the local ports, in the order of the remote ones."""
        try:
            return await super().start()
        except TunnelError as exc:
            raise TunnelError(str(exc), target="kubernetes") from exc

    def prime(self) -> None:
        """Get ready for the client's first connections, now that the kernel listens:
        one pair of SPDY streams per port (the kernel's greeting waits in it), or one
        websocket per port.

        The client's first connections (and ZMQ's subscription on iopub) then skip the
        connection's handshake.
        """
        self._drop_spares()
        if self.transport == "spdy":
            task = asyncio.create_task(self._prime_spdy(self.pod))
            task.add_done_callback(_quiet)
            return
        for remote in self.remote_ports:
            self._spares[remote] = asyncio.create_task(self._open(self.pod, remote))

    async def stop(self) -> None:
        """Close the listeners, every forwarded connection and the SPDY connection."""
        self._drop_spares()
        await super().stop()
        session = self._drop_session()
        if session is not None:
            await session.aclose()

    # ------------------------------------------------------------------ SPDY
    async def _prime_spdy(self, pod: str) -> None:
        session = await self._session_for(pod)
        for remote in self.remote_ports:
            if pod == self.pod and remote not in self._pairs:
                self._pairs[remote] = session.open_pair(remote)

    def _take_pair(
        self, pod: str, remote: int, session: spdy.SpdySession
    ) -> tuple[spdy.SpdyStream, spdy.SpdyStream] | None:
        """The primed pair of streams to ``remote``, if it still leads to the kernel."""
        pair = self._pairs.pop(remote, None)
        if pair is None:
            return None
        data, error = pair
        if pod == self.pod and data.session is session and not data.ended.done():
            return pair
        data.reset()
        error.reset()
        return None

    def _drop_session(self) -> spdy.SpdySession | None:
        """Forget the SPDY connection (closed: its streams end) and any opening one."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
        for retired in list(self._retired):
            retired.close()
        session, self._session = self._session, None
        if session is not None:
            session.close()
        return session

    def _open_session(self, pod: str) -> asyncio.Task[spdy.SpdySession]:
        """The task opening the SPDY connection to ``pod`` (one at a time, shared)."""
        if self._opening is not None and self._session_pod == pod and not self._opening.done():
            return self._opening
        self._session_pod = pod
        self._opening = asyncio.create_task(self._connect(pod))
        return self._opening

    async def _connect(self, pod: str) -> spdy.SpdySession:
        path = resource_path("pods", self.namespace, pod, "portforward")
        session = await spdy.connect(
            self.client, path, timeout=self.connect_timeout, executor=KUBERNETES_EXECUTOR
        )
        if pod != self.pod:  # retargeted meanwhile
            session.close()
            msg = f"pod {pod} is no longer the port-forward's target"
            raise spdy.SessionClosed(msg, target="kubernetes")
        self.connections_opened += 1
        old, self._session = self._session, session
        if old is not None and not old.closed.done():  # going away: its streams run on
            self._retired.add(old)
            old.closed.add_done_callback(lambda _: self._retired.discard(old))
        self.log.debug("Port-forward to pod %s: SPDY connection opened", pod)
        return session

    async def _session_for(self, pod: str) -> spdy.SpdySession:
        """The open SPDY connection to ``pod`` (opened if needed).

        Raises :class:`KubeApiError` (the pod is not there, the API refuses...),
        :class:`_UseWebsocket` when the server refused the SPDY upgrade where a
        websocket is accepted (remembered for this server), :class:`SessionClosed`."""
        session = self._session
        if session is not None and not session.going_away and self._session_pod == pod:
            return session
        task = self._open_session(pod)
        try:
            return await asyncio.shield(task)
        except spdy.SpdyRefused as exc:
            await self._confirm_refusal(pod, exc)
            raise
        finally:
            if task.done() and self._opening is task:
                self._opening = None

    async def _confirm_refusal(self, pod: str, refused: spdy.SpdyRefused) -> None:
        """Raise :class:`_UseWebsocket` if a websocket to ``pod`` is accepted where the
        SPDY upgrade was refused (then the protocol is at fault, not the pod: said once,
        and websockets are used for this server from now on); else the websocket's
        :class:`KubeApiError` (a pod not running yet, say)."""
        ws = await self._open(pod, self.remote_ports[0])
        await _close(ws)
        if self._server not in _NO_SPDY:
            _NO_SPDY.add(self._server)
            self.log.warning(
                "The API server %s refused the SPDY/3.1 port-forward upgrade (%s); "
                "port-forwards use one websocket per connection instead",
                self._server,
                refused,
            )
        raise _UseWebsocket(str(refused), target="kubernetes") from refused

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        remote = self.remote_ports[index]
        try:
            if self.transport == "spdy":
                try:
                    await self._serve_spdy(reader, writer, remote)
                    return
                except _UseWebsocket:
                    pass
            await self._serve_ws(reader, writer, remote)
        except asyncio.CancelledError:
            raise
        except KubeApiError as exc:
            self._log_refusal(remote, exc)
        except Exception as exc:
            self.log.debug("Port-forward to %s:%s ended: %r", self.pod, remote, exc)

    async def _serve_spdy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: int
    ) -> None:
        """Relay one client connection over a stream pair of the pod's SPDY connection;
        raises :class:`_UseWebsocket` when the server refuses SPDY, else what reaching
        the kernel raises."""
        pair: tuple[spdy.SpdyStream, spdy.SpdyStream] | None = None
        try:
            pair = await self._reach_kernel_spdy(remote)
            data, error = pair
            data.attach(_sink(writer))
            upstream = asyncio.create_task(_tcp_to_stream(reader, data))
            try:
                both: set[asyncio.Future[Any]] = {upstream, data.ended}
                await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
                if upstream.done() and not data.ended.done():
                    # the client closed: the pod's side ends once the kubelet sees the FIN
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(data.ended), _LINGER)
            finally:
                upstream.cancel()
                await asyncio.gather(upstream, return_exceptions=True)
            if error.buffer:
                text = error.buffer.decode(errors="replace").strip()
                self.log.debug("Port-forward to %s:%s: %s", self.pod, remote, text)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), _LINGER)
        finally:
            if pair is not None:
                for stream in pair:
                    stream.reset()

    async def _reach_kernel_spdy(self, remote: int) -> tuple[spdy.SpdyStream, spdy.SpdyStream]:
        """The (data, error) streams to ``remote`` of the current pod, once its kernel
        has sent its first bytes (its ZMTP greeting, buffered in the data stream); tried
        again while the pod refuses, is not there yet (a restart) or the connection is
        lost, for up to ``connect_timeout``. The client's connection stays open
        meanwhile, as the websocket way's does (see :meth:`_reach_kernel`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            pod = self.pod
            try:
                session = await self._session_for(pod)
                data, error = self._take_pair(pod, remote, session) or session.open_pair(remote)
                try:
                    await data.wait_data(max(_RETRY, deadline - loop.time()))
                except BaseException:
                    data.reset()
                    error.reset()
                    raise
                if data.buffer:
                    return data, error
                data.reset()  # refused (the kernel does not listen yet), or the pod's end
                error.reset()
            except spdy.SessionClosed:
                pass
            except (KubeApiError, asyncio.TimeoutError) as exc:
                retry = not isinstance(exc, KubeApiError) or isinstance(exc, NotFound)
                retry = retry or (isinstance(exc, KubeApiError) and exc.transient)
                if loop.time() >= deadline or not retry:
                    raise
            if loop.time() >= deadline:
                msg_ = f"pod {pod} port {remote} did not answer within {self.connect_timeout:g} s"
                raise PortForwardError(msg_, target="kubernetes")
            await asyncio.sleep(_RETRY)

    async def _probe_spdy(self, remote: int, timeout: float) -> bool:
        try:
            session = await self._session_for(self.pod)
        except spdy.SessionClosed:
            return False
        data, error = session.open_pair(remote)
        try:
            await data.wait_data(timeout)
            return data.buffer[:1] == b"\xff"
        except asyncio.TimeoutError:
            return False
        finally:
            data.reset()
            error.reset()

    def _log_refusal(self, remote: int, exc: KubeApiError) -> None:
        # warn once per pod and status, not at each of ZMQ's reconnects; a 404 (the
        # pod is gone: a client reconnecting during a restart) is no news.
        seen = (self.pod, exc.status)
        quiet = isinstance(exc, NotFound) or seen in self._warned
        level = logging.DEBUG if quiet else logging.WARNING
        self._warned.add(seen)
        self.log.log(level, "Port-forward to pod %s port %s failed: %s", self.pod, remote, exc)

    async def probe(self, index: int, timeout: float = 2.0) -> bool:
        """True when a ZMQ socket answers on ``remote_ports[index]`` of the pod.

        ZMQ peers send their greeting (first byte 0xFF) as soon as they are connected, so
        it arrives on the data stream once the kernel listens; a refused connection
        comes back as text on the error stream. Raises :class:`KubeApiError` when the
        API refuses or cannot be reached.
        """
        remote = self.remote_ports[index]
        if self.transport == "spdy":
            try:
                return await self._probe_spdy(remote, timeout)
            except _UseWebsocket:
                pass
        return await self._probe_ws(remote, timeout)

    # ------------------------------------------------------------------ websockets
    def _drop_spares(self) -> None:
        pairs, self._pairs = self._pairs, {}
        for data, error in pairs.values():
            data.reset()
            error.reset()
        spares, self._spares = self._spares, {}
        for task in spares.values():
            task.cancel()
            task.add_done_callback(_close_spare)

    async def _open(self, pod: str, remote: int) -> aiohttp.ClientWebSocketResponse:
        return await self.client.websocket(
            resource_path("pods", self.namespace, pod, "portforward"),
            [("ports", str(remote))],
            PORTFORWARD_PROTOCOLS,
            self.connect_timeout,
        )

    async def _take_spare(self, pod: str, remote: int) -> aiohttp.ClientWebSocketResponse | None:
        task = self._spares.pop(remote, None)
        if task is None or pod != self.pod:
            return None
        with contextlib.suppress(Exception):
            ws = await task
            if not ws.closed:
                return ws
        return None

    async def _serve_ws(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: int
    ) -> None:
        """Relay one client connection over a websocket of its own; raises what reaching
        the kernel raises."""
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws, frames, greeting = await self._reach_kernel(remote)
            writer.write(greeting)
            upstream = asyncio.create_task(_tcp_to_ws(reader, ws))
            downstream = asyncio.create_task(_ws_to_tcp(ws, writer, frames))
            try:
                done, _ = await asyncio.wait(
                    {upstream, downstream}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (upstream, downstream):
                    task.cancel()
                await asyncio.gather(upstream, downstream, return_exceptions=True)
            for task in done:
                error = task.exception()
                if isinstance(error, PortForwardError):
                    self.log.debug("Port-forward to %s:%s: %s", self.pod, remote, error)
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)

    async def _reach_kernel(
        self, remote: int
    ) -> tuple[aiohttp.ClientWebSocketResponse, _Deframer, bytes]:
        """A websocket to ``remote`` of the current pod whose kernel has sent its first
        bytes (its ZMTP greeting), with them; tried again while the pod refuses, is not
        there yet (a restart) or the stream fails, for up to ``connect_timeout``.

        The client's connection stays open meanwhile: a client that reconnected during a
        restart (its iopub subscriber, its shell) reaches the new kernel as soon as the
        kernel listens, at once on every channel, instead of at ZMQ's next reconnect,
        when a request sent meanwhile may already have run (its output lost).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            pod = self.pod
            ws: aiohttp.ClientWebSocketResponse | None = None
            try:
                ws = await self._take_spare(pod, remote) or await self._open(pod, remote)
                frames = _Deframer()
                left = max(_RETRY, deadline - loop.time())
                while (msg := await asyncio.wait_for(ws.receive(), left)).type == BINARY:
                    channel, payload = frames.feed(msg.data)
                    if channel == 0 and payload:
                        return ws, frames, payload
                    if payload:  # the error channel: the kernel refused (not listening yet)
                        break
            except (KubeApiError, asyncio.TimeoutError) as exc:
                # a pod not there yet, an answer worth another try, a kernel silent so far
                retry = not isinstance(exc, KubeApiError) or isinstance(exc, NotFound)
                retry = retry or (isinstance(exc, KubeApiError) and exc.transient)
                if loop.time() >= deadline or not retry:
                    await _close(ws)
                    raise
            except BaseException:
                await _close(ws)
                raise
            await _close(ws)
            if loop.time() >= deadline:
                msg_ = f"pod {pod} port {remote} did not answer within {self.connect_timeout:g} s"
                raise PortForwardError(msg_, target="kubernetes")
            await asyncio.sleep(_RETRY)

    async def _probe_ws(self, remote: int, timeout: float) -> bool:
        ws = await self.client.websocket(self.path, [("ports", str(remote))], PORTFORWARD_PROTOCOLS)
        try:
            frames = _Deframer()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await asyncio.wait_for(ws.receive(), left)
                except asyncio.TimeoutError:
                    return False
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return False
                channel, payload = frames.feed(msg.data)
                if payload:
                    return channel == 0 and payload[0] == 0xFF
            return False
        finally:
            await asyncio.wait_for(ws.close(), 2)


class _UseWebsocket(TunnelError):
    """The API server refused the SPDY upgrade and accepts websockets: use those."""


def _quiet(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's outcome (failures show at the next real use)."""
    if not task.cancelled():
        task.exception()


def _sink(writer: asyncio.StreamWriter) -> Callable[[bytes], None]:
    """Writes to the client's connection, dropped once it is closing."""
    transport = writer.transport

    def write(data: bytes) -> None:
        if not transport.is_closing():
            transport.write(data)

    return write


async def _tcp_to_stream(reader: asyncio.StreamReader, stream: spdy.SpdyStream) -> None:
    """The client's bytes to ``stream``; FIN when the client closes."""
    session = stream.session
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            stream.close_write()
            return
        stream.send(data)
        if session.write_paused:
            await session.drain()


async def _close(ws: aiohttp.ClientWebSocketResponse | None) -> None:
    """Close ``ws`` (if any) within 2 s; never raises."""
    if ws is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)


def _close_spare(task: asyncio.Task[aiohttp.ClientWebSocketResponse]) -> None:
    """Close the websocket of a dropped spare, if it opened."""
    if task.cancelled() or task.exception() is not None:
        return
    ws = task.result()
    if not ws.closed:
        asyncio.get_running_loop().create_task(ws.close())


class PortForwardError(TunnelError):
    """The server reported an error on a port-forward stream."""


class _Deframer:
    """Splits port-forward frames into (channel, payload), dropping each channel's port prefix."""

    def __init__(self) -> None:
        self.prefix_left: dict[int, int] = {}

    def feed(self, frame: bytes) -> tuple[int, bytes]:
        if not frame:
            return -1, b""
        channel, payload = frame[0], frame[1:]
        left = self.prefix_left.setdefault(channel, 2)
        if left:
            cut = min(left, len(payload))
            self.prefix_left[channel] = left - cut
            payload = payload[cut:]
        return channel, payload


async def _tcp_to_ws(reader: asyncio.StreamReader, ws: aiohttp.ClientWebSocketResponse) -> None:
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            return
        await ws.send_bytes(b"\x00" + data)


async def _ws_to_tcp(
    ws: aiohttp.ClientWebSocketResponse, writer: asyncio.StreamWriter, frames: _Deframer
) -> None:
    error = b""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            continue
        channel, payload = frames.feed(msg.data)
        if channel == 0 and payload:
            writer.write(payload)
            await writer.drain()
        elif channel == 1 and payload:
            error += payload
    if error:
        raise PortForwardError(error.decode(errors="replace").strip(), target="kubernetes")


# ---------------------------------------------------------------------- exec


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a pod returned."""

    exit_code: int
    stdout: str
    stderr: str


async def pod_exec(
    client: KubeClient,
    namespace: str,
    pod: str,
    command: Sequence[str],
    *,
    container: str = "",
    timeout: float = 10.0,
) -> ExecResult:
    """Run ``command`` (an argv, no shell) in ``pod`` and return its exit code and output."""
    query = [("command", str(arg)) for arg in command]
    query += [("stdout", "true"), ("stderr", "true")]
    if container:
        query.append(("container", container))
    path = resource_path("pods", namespace, pod, "exec")
    ws = await client.websocket(path, query, EXEC_PROTOCOLS, timeout)
    out: dict[int, bytearray] = {1: bytearray(), 2: bytearray(), 3: bytearray()}

    async def read() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                buf = out.get(msg.data[0])
                if buf is not None:
                    buf += msg.data[1:]

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError as exc:
        msg = f"exec in pod {pod} did not finish within {timeout:g} s"
        raise KubeApiError(0, "Timeout", msg) from exc
    finally:
        await asyncio.wait_for(ws.close(), 2)
    stdout, stderr = out[1].decode(errors="replace"), out[2].decode(errors="replace")
    return ExecResult(_exit_code(bytes(out[3])), stdout, stderr)


def _exit_code(status: bytes) -> int:
    """The exit code in an exec ``Status`` (0 on Success or when none was sent)."""
    if not status.strip():
        return 0
    try:
        data = json.loads(status)
    except ValueError:
        return 1
    if data.get("status") == "Success":
        return 0
    for cause in (data.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return int(cause.get("message"))
    msg = str(data.get("message") or "exec failed")
    raise KubeApiError(int(data.get("code") or 0), str(data.get("reason") or ""), msg)

"""Reaching into a pod through the API server's websockets: port-forward and exec.

Port-forward (``GET .../pods/NAME/portforward?ports=P``, subprotocol
``v4.channel.k8s.io``, which kubelets also accept as ``portforward.k8s.io``): every frame
starts with a channel byte; for the i-th requested port, channel ``2i`` carries data both
ways and channel ``2i+1`` carries error text from the server; the server's first frame on
each channel starts with the port number as two little-endian bytes. One websocket
carries one TCP connection, so :class:`PortForwarder` opens one per accepted local
connection: a dropped websocket only ends that connection, and the next one (ZMQ
reconnects by itself) opens a fresh websocket.

Exec (``.../pods/NAME/exec``, ``v4.channel.k8s.io``): channels 1 and 2 are stdout and
stderr, channel 3 carries the final ``Status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..connection.relay import LocalRelay
from ..exceptions import TunnelError
from .client import KubeApiError, KubeClient, NotFound, resource_path
from .loop import KUBERNETES_EXECUTOR

#: Offered in this order; the server picks the first it speaks.
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "portforward.k8s.io")
EXEC_PROTOCOLS = ("v4.channel.k8s.io",)
_CHUNK = 256 * 1024
#: Seconds between two tries to reach a kernel that does not listen yet.
_RETRY = 0.05
BINARY = aiohttp.WSMsgType.BINARY

log = logging.getLogger(__name__)


class PortForwarder(LocalRelay):
    """Local TCP listeners forwarding each connection to a pod port over a websocket.

    ``local_ports`` are the ports to listen on (0, or a port that cannot be bound, takes
    one from the cluster port cache: :attr:`local_ports` tells which were used). Use it
    as an async context manager or through :meth:`start` / :meth:`stop`.
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
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.remote_ports = [int(p) for p in remote_ports]
        wanted = list(local_ports) if local_ports is not None else [0] * len(self.remote_ports)
        if len(wanted) != len(self.remote_ports):
            msg = "local_ports and remote_ports differ in length"
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
        self._warned: set[tuple[str, int]] = set()
        self._spares: dict[int, asyncio.Task[aiohttp.ClientWebSocketResponse]] = {}

    @property
    def path(self) -> str:
        return resource_path("pods", self.namespace, self.pod, "portforward")

    def retarget(self, pod: str) -> None:
        """Send new connections to pod ``pod`` (open ones keep their websocket)."""
        if pod != self.pod:
            self._drop_spares()
        self.pod = pod

    async def start(self) -> list[int]:
        """Open the listeners; return the local ports, in the order of the remote ones."""
        try:
            return await super().start()
        except TunnelError as exc:
            raise TunnelError(str(exc), target="kubernetes") from exc

    def prime(self) -> None:
        """Open one websocket per port now, for the next local connection to each port.

        Call it once the kernel listens: the client's first connections (and ZMQ's
        subscription on iopub) then skip the websocket handshake.
        """
        self._drop_spares()
        for remote in self.remote_ports:
            self._spares[remote] = asyncio.create_task(self._open(self.pod, remote))

    def _drop_spares(self) -> None:
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

    async def stop(self) -> None:
        """Close the listeners and every forwarded connection."""
        self._drop_spares()
        await super().stop()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        remote = self.remote_ports[index]
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
        except asyncio.CancelledError:
            raise
        except KubeApiError as exc:
            # warn once per pod and status, not at each of ZMQ's reconnects; a 404 (the
            # pod is gone: a client reconnecting during a restart) is no news.
            seen = (self.pod, exc.status)
            quiet = isinstance(exc, NotFound) or seen in self._warned
            level = logging.DEBUG if quiet else logging.WARNING
            self._warned.add(seen)
            self.log.log(level, "Port-forward to pod %s port %s failed: %s", self.pod, remote, exc)
        except Exception as exc:
            self.log.debug("Port-forward to %s:%s ended: %r", self.pod, remote, exc)
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

    async def probe(self, index: int, timeout: float = 2.0) -> bool:
        """True when a ZMQ socket answers on ``remote_ports[index]`` of the pod.

        ZMQ peers send their greeting (first byte 0xFF) as soon as they are connected, so
        it arrives on the data channel once the kernel listens; a refused connection
        comes back as text on the error channel.
        """
        ws = await self.client.websocket(
            self.path, [("ports", str(self.remote_ports[index]))], PORTFORWARD_PROTOCOLS
        )
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

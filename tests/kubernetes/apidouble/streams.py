"""Streaming endpoints of the double: pods/log, pods/exec and pods/portforward (the
SPDY/3.1 upgrade of pods/portforward is in ``spdyserver``).

Websocket framing follows the kubelet: every message starts with a channel byte
(``channel.k8s.io``; the ``base64.`` variants send text with an ASCII digit and base64
data). exec: 0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize; v4/v5 send a JSON v1
Status on channel 3, v5 adds the client's close signal (255, channel). portforward: per
requested port a data channel 2i and an error channel 2i+1, and the first message on
each carries the port as two little-endian bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import docker.errors
from aiohttp import WSMsgType, web

from . import spdyserver
from .meta import JSON, bad_request, not_found
from .runtime import connect_in_netns

if TYPE_CHECKING:
    from .cluster import Cluster
    from .kubelet import ContainerRecord, PodWorker

EXEC_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io")
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def _bool(value: str | None) -> bool:
    return value is not None and value.lower() not in ("", "0", "false")


def _pod_and_worker(cluster: Cluster, ns: str, name: str) -> tuple[JSON, PodWorker | None]:
    pod = cluster.store.get("pods", ns, name)
    if pod is None:
        raise not_found("pods", name)
    if not pod["spec"].get("nodeName"):
        raise bad_request(f"pod {name} does not have a host assigned")
    return pod, cluster.workers.get(pod["metadata"]["uid"])


def _pick_container(pod: JSON, worker: PodWorker | None, wanted: str | None) -> ContainerRecord:
    spec = pod["spec"]
    mains = [c["name"] for c in spec["containers"]]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    name = pod["metadata"]["name"]
    if not wanted:
        if len(mains) != 1:
            extra = f" or one of the init containers: [{' '.join(inits)}]" if inits else ""
            raise bad_request(
                f"a container name must be specified for pod {name}, "
                f"choose one of: [{' '.join(mains)}]{extra}"
            )
        wanted = mains[0]
    if wanted not in mains + inits:
        raise bad_request(f"container {wanted} is not valid for pod {name}")
    rec = worker.container(wanted) if worker else None
    if rec is None:
        raise bad_request(
            f'container "{wanted}" in pod "{name}" is waiting to start: ContainerCreating'
        )
    return rec


def negotiate(request: web.Request, allowed: tuple[str, ...]) -> str:
    """The subprotocol the kubelet would pick: the client's first supported one, "" when
    the client asks for none. A client asking only for unsupported ones is refused
    before the upgrade (golang.org/x/net/websocket answers 403 there)."""
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    if not offered:
        return ""
    for protocol in offered:
        if protocol in allowed:
            return protocol
    raise web.HTTPForbidden(
        text=f"requested protocol(s) are not supported: {offered}; supports {list(allowed)}"
    )


class ChannelSocket:
    """A prepared websocket speaking one channel.k8s.io flavour; sends are serialized."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str) -> None:
        self.ws = ws
        self.base64 = "base64" in protocol
        self.lock = asyncio.Lock()

    async def send(self, channel: int, data: bytes) -> None:
        async with self.lock:
            if self.ws.closed:
                return
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                if self.base64:
                    await self.ws.send_str(
                        chr(ord("0") + channel) + base64.b64encode(data).decode()
                    )
                else:
                    await self.ws.send_bytes(bytes([channel]) + data)

    def decode(self, msg: Any) -> tuple[int, bytes] | None:
        if msg.type == WSMsgType.BINARY and not self.base64 and msg.data:
            return msg.data[0], msg.data[1:]
        if msg.type == WSMsgType.TEXT and self.base64 and msg.data:
            return ord(msg.data[0]) - ord("0"), base64.b64decode(msg.data[1:])
        return None


def _require_upgrade(request: web.Request) -> None:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise bad_request("Upgrade request required")


async def _upgrade(request: web.Request, protocol: str) -> ChannelSocket:
    _require_upgrade(request)
    ws = web.WebSocketResponse(
        protocols=(protocol,) if protocol else (), max_msg_size=0, autoping=True
    )
    await ws.prepare(request)
    return ChannelSocket(ws, protocol)


# --- logs ---------------------------------------------------------------------------------
async def logs(cluster: Cluster, request: web.Request, ns: str, name: str) -> web.StreamResponse:
    """GET pods/{name}/log with container, follow, previous, tailLines, timestamps,
    sinceSeconds and limitBytes."""
    query = request.query
    pod, worker = _pod_and_worker(cluster, ns, name)
    rec = _pick_container(pod, worker, query.get("container"))
    cid = rec.prev_docker_id if _bool(query.get("previous")) else rec.docker_id
    if cid is None:
        if _bool(query.get("previous")):
            raise bad_request(
                f'previous terminated container "{rec.name}" in pod "{name}" not found'
            )
        reason = (rec.state.get("waiting") or {}).get("reason", "ContainerCreating")
        if reason in ("ErrImagePull", "ImagePullBackOff"):
            reason = (
                "trying and failing to pull image"
                if reason == "ErrImagePull"
                else "image can't be pulled"
            )
        raise bad_request(f'container "{rec.name}" in pod "{name}" is waiting to start: {reason}')
    kwargs: JSON = {"timestamps": _bool(query.get("timestamps"))}
    if query.get("tailLines"):
        kwargs["tail"] = max(int(query["tailLines"]), 0)
    if query.get("sinceSeconds"):
        kwargs["since"] = int(time.time()) - int(query["sinceSeconds"])
    limit = int(query["limitBytes"]) if query.get("limitBytes") else None
    rt = cluster.runtime
    if not _bool(query.get("follow")):
        data: bytes = await rt.call(None, rt.logs, cid, **kwargs)
        return web.Response(body=data[:limit] if limit else data, content_type="text/plain")
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    stream = await rt.call(None, rt.logs, cid, stream=True, follow=True, **kwargs)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def pump() -> None:
        with contextlib.suppress(Exception):
            for chunk in stream:
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="k8s-double-logs", daemon=True).start()
    sent = 0
    try:
        while (chunk := await queue.get()) is not None:
            if limit is not None:
                chunk = chunk[: max(limit - sent, 0)]
            sent += len(chunk)
            await response.write(chunk)
            if limit is not None and sent >= limit:
                break
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    return response


# --- exec -----------------------------------------------------------------------------------
def _exec_status(
    protocol: str, command: list[str], code: int | None, runtime_error: str | None
) -> bytes:
    """What the kubelet writes on the status channel when the command ends."""
    v4 = protocol.startswith(("v4.", "v5."))
    if runtime_error is not None:
        cause = (
            f"error executing command in container: failed to exec in container: {runtime_error}"
        )
        status: JSON = {
            "metadata": {},
            "status": "Failure",
            "message": f"Internal error occurred: {cause}",
            "reason": "InternalError",
            "details": {"causes": [{"message": cause}]},
            "code": 500,
        }
    elif code == 0:
        return _compact({"metadata": {}, "status": "Success"}) if v4 else b""
    else:
        message = (
            f"command terminated with non-zero exit code: error executing command "
            f"[{' '.join(command)}], exit code {code}"
        )
        status = {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    return _compact(status) if v4 else str(status["message"]).encode()


def _compact(obj: JSON) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def exec_handler(
    cluster: Cluster, request: web.Request, ns: str, name: str
) -> web.StreamResponse:
    query = request.query
    pod, worker = _pod_and_worker(cluster, ns, name)
    command = query.getall("command", [])
    if not command:
        raise bad_request("you must specify at least one command for the container")
    stdin, stdout, tty = (
        _bool(query.get("stdin")),
        _bool(query.get("stdout")),
        _bool(query.get("tty")),
    )
    stderr = _bool(query.get("stderr")) and not tty
    if not (stdin or stdout or stderr):
        raise bad_request("you must specify at least 1 of stdin, stdout, stderr")
    rec = _pick_container(pod, worker, query.get("container"))
    if not rec.docker_id or "running" not in rec.state:
        raise bad_request(f'unable to upgrade connection: container not found ("{rec.name}")')
    protocol = negotiate(request, EXEC_PROTOCOLS)
    _require_upgrade(request)
    rt = cluster.runtime
    try:
        exec_id, sock = await rt.call(None, rt.exec_open, rec.docker_id, command, stdin, tty)
    except docker.errors.APIError as exc:
        raise bad_request(
            f'unable to upgrade connection: container not found ("{rec.name}"): {exc.explanation}'
        ) from exc
    chan = await _upgrade(request, protocol)
    await chan.send(STDOUT if stdout else STDERR if stderr else STATUS, b"")
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
    threading.Thread(
        target=_read_exec, args=(sock, tty, loop, output), daemon=True, name="k8s-double-exec"
    ).start()
    feeder = asyncio.create_task(
        _feed_exec(
            chan, sock, stdin, protocol, lambda h, w: rt.call(None, rt.exec_resize, exec_id, h, w)
        )
    )
    held: list[tuple[int, bytes]] = []
    first = True
    try:
        while True:
            getter = asyncio.ensure_future(output.get())
            await asyncio.wait([getter, feeder], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the client went away: the command keeps running, as in a pod
                getter.cancel()
                return chan.ws
            item = getter.result()
            if item is None:
                break
            if first and item[1].startswith(b"OCI runtime exec failed"):
                held.append(item)
            elif (item[0] == STDOUT and stdout) or (item[0] == STDERR and stderr):
                await chan.send(item[0], item[1])
            first = False
        code = await rt.call(None, rt.exec_exit_code, exec_id)
        runtime_error = None
        if held and code in (126, 127):
            runtime_error = (
                f'failed to start exec "{exec_id}": ' + held[0][1].decode(errors="replace").strip()
            )
        else:
            for channel, data in held:
                if (channel == STDOUT and stdout) or (channel == STDERR and stderr):
                    await chan.send(channel, data)
        await chan.send(STATUS, _exec_status(protocol, command, code, runtime_error))
    finally:
        feeder.cancel()
        with contextlib.suppress(OSError):
            sock.close()
        await chan.ws.close()
    return chan.ws


def _read_exec(
    sock: socket.socket,
    tty: bool,
    loop: asyncio.AbstractEventLoop,
    output: asyncio.Queue[tuple[int, bytes] | None],
) -> None:
    """Read docker's exec stream (multiplexed 8-byte frame headers unless tty)."""

    def recv_exact(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    with contextlib.suppress(EOFError, OSError):
        while True:
            if tty:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                loop.call_soon_threadsafe(output.put_nowait, (STDOUT, chunk))
                continue
            kind, size = struct.unpack(">BxxxL", recv_exact(8))
            payload = recv_exact(size)
            loop.call_soon_threadsafe(output.put_nowait, (STDERR if kind == 2 else STDOUT, payload))
    loop.call_soon_threadsafe(output.put_nowait, None)


async def _feed_exec(
    chan: ChannelSocket,
    sock: socket.socket,
    stdin: bool,
    protocol: str,
    resize: Callable[[int, int], Awaitable[None]],
) -> None:
    """Client → container: stdin bytes, v5 close of stdin, terminal resizes."""
    loop = asyncio.get_running_loop()
    async for msg in chan.ws:
        decoded = chan.decode(msg)
        if decoded is None:
            continue
        channel, data = decoded
        if channel == STDIN and stdin and data:
            await loop.run_in_executor(None, sock.sendall, data)
        elif channel == CLOSE and protocol.startswith("v5.") and data[:1] == bytes([STDIN]):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        elif channel == RESIZE:
            with contextlib.suppress(ValueError, KeyError):
                size = json.loads(data)
                await resize(int(size["Height"]), int(size["Width"]))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


# --- port-forward ----------------------------------------------------------------------------
async def portforward_handler(
    cluster: Cluster, request: web.Request, ns: str, name: str
) -> web.StreamResponse:
    pod, worker = _pod_and_worker(cluster, ns, name)
    if spdyserver.is_spdy_upgrade(request):  # ports come in each stream's headers
        sandbox = worker.sandbox if worker else None
        if sandbox is None or pod["status"].get("phase") in ("Succeeded", "Failed"):
            raise bad_request("unable to upgrade connection: pod does not exist")
        if spdyserver.stats(cluster).refuse_upgrade:
            raise bad_request("Upgrade request required")
        return await spdyserver.serve(request, cluster, name, sandbox)
    ports: list[int] = []
    for value in request.query.getall("ports", []):
        for item in value.split(","):
            try:
                port = int(item)
            except ValueError as exc:
                raise bad_request(f'unable to parse "{value}" as a port: {exc}') from exc
            if not 0 < port < 65536:
                raise bad_request(f'port "{value}" must be > 0 and < 65536')
            ports.append(port)
    if not ports:
        raise bad_request('query parameter "port" is required')
    sandbox = worker.sandbox if worker else None
    if sandbox is None or pod["status"].get("phase") in ("Succeeded", "Failed"):
        raise bad_request("unable to upgrade connection: pod does not exist")
    protocol = negotiate(request, PORTFORWARD_PROTOCOLS)
    chan = await _upgrade(request, protocol)
    spdyserver.stats(cluster).websockets += 1
    for index, port in enumerate(ports):
        await chan.send(2 * index, struct.pack("<H", port))
        await chan.send(2 * index + 1, struct.pack("<H", port))
    loop = asyncio.get_running_loop()
    conns: dict[int, asyncio.Future[asyncio.StreamWriter | None]] = {
        2 * index: loop.create_future() for index in range(len(ports))
    }
    tasks = [
        asyncio.create_task(_forward(chan, sandbox, index, port, conns[2 * index]))
        for index, port in enumerate(ports)
    ]
    relay = asyncio.create_task(_client_to_pods(chan, conns))
    forwards = asyncio.gather(*tasks, return_exceptions=True)
    try:
        await asyncio.wait([forwards, relay], return_when=asyncio.FIRST_COMPLETED)
    finally:
        relay.cancel()
        forwards.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwards
        for conn in conns.values():
            if conn.done() and conn.result() is not None:
                conn.result().close()
        await chan.ws.close()
    return chan.ws


async def _connect(sandbox: Any, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """localhost:port inside the pod's network namespace, then the pod IP (as containerd)."""
    loop = asyncio.get_running_loop()
    errors = []
    try:
        if sandbox.host_network:
            sock = await loop.run_in_executor(
                None, socket.create_connection, ("127.0.0.1", port), 5
            )
        else:
            sock = await loop.run_in_executor(None, connect_in_netns, sandbox.pid, port)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock)
    except OSError as exc:
        errors.append(
            f"IPv4: dial tcp4 127.0.0.1:{port}: connect: {(exc.strerror or str(exc)).lower()}"
        )
    if not sandbox.host_network and sandbox.ip:
        try:
            return await asyncio.wait_for(asyncio.open_connection(sandbox.ip, port), 5)
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(
                f"pod IP: dial tcp {sandbox.ip}:{port}: connect: "
                + (getattr(exc, "strerror", None) or str(exc) or "timeout").lower()
            )
    raise ConnectionError(
        f'failed to execute portforward in network namespace "/proc/{sandbox.pid}/ns/net": '
        f'failed to connect to localhost:{port} inside namespace "{sandbox.id}", '
        + " ".join(errors)
    )


async def _forward(
    chan: ChannelSocket,
    sandbox: Any,
    index: int,
    port: int,
    conn: asyncio.Future[asyncio.StreamWriter | None],
) -> None:
    """Pod → client for one port, connecting at once like the kubelet; an error message
    on the port's error channel if the connection cannot be made."""
    try:
        reader, writer = await _connect(sandbox, port)
    except ConnectionError as exc:
        conn.set_result(None)
        await chan.send(
            2 * index + 1, f"error forwarding port {port} to pod {sandbox.id}, uid : {exc}".encode()
        )
        return
    conn.set_result(writer)
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            await chan.send(2 * index, data)


async def _client_to_pods(
    chan: ChannelSocket, conns: dict[int, asyncio.Future[asyncio.StreamWriter | None]]
) -> None:
    """Client → pod: data channel messages go to that port's connection, in order."""
    async for msg in chan.ws:
        decoded = chan.decode(msg)
        if decoded is None:
            continue
        channel, data = decoded
        if channel not in conns or not data:
            continue
        writer = await conns[channel]
        if writer is None:
            continue
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(data)
            await writer.drain()

"""A restart keeps the kernel's address; only a port taken meanwhile moves.

A client that keeps its sockets through a restart keeps talking to the address it was
given: Jupyter Server re-creates a websocket's ZMQ streams only when the client
reconnects, and JupyterLab's and ``GatewayClient``'s websockets stay open. So every
restart, REST or automatic, with ``newports=True`` or not, keeps the kernel's ports, as
jupyter_client's ``LocalProvisioner`` does in practice. The client-side ports are the
kernel's own, or the local listeners of SSH tunnels and port-forwards, which their
target keeps through a restart. A kernel port that something else holds at restart time
moves to a fresh one from the port cache (only that port), with a WARNING naming the
kernel and the ports: clients with open sockets lose that channel until they reconnect.

"Taken" is judged where the restarted kernel will bind. On this machine (the kernel
process, or docker-proxy for a published port: :meth:`EngineHooks.binds_ports_here`),
by a bind test as the kernel binds, with ``SO_REUSEADDR``, so the dead kernel's
connections in TIME_WAIT do not count. Elsewhere (a remote SSH host, a Docker daemon
over SSH, a node's host network), by the engine's port sources
(:meth:`PortSource.ports_listening`). A port-forward's or a pod's ports are never taken.

jupyter_client's restart runs ``cleanup(restart=True)``, then, for ``newports=True``,
zeroes the manager's random ports, then starts the kernel again; Jupyter Server
reconnects a notebook's channels at that very moment. So ``pre_launch`` writes the
client-side ports back into the manager before its first await (:func:`show_kept_ports`:
a client connecting then never sees port 0), and only then checks the ports
(:func:`keep_or_move`), as late as it can before the kernel binds them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..connection.ports import LOCAL_HOST, ClusterPortCache, PortSource
from ..exceptions import ProvisionerError
from .engine import PORT_NAMES

if TYPE_CHECKING:
    from .base import ClusterProvisioner

#: Addresses a kernel or docker-proxy may bind on this machine.
BIND_ADDRESSES = ("127.0.0.1", "0.0.0.0")
#: How long a port that cannot be bound is retried before it counts as taken: a margin
#: for an engine's proxy to exit after its container's removal (measured 0 s with
#: docker-proxy here; a port held by anything else costs this once, then moves).
RELEASE_GRACE = 0.5


def show_kept_ports(provisioner: ClusterProvisioner) -> None:
    """Write the kernel's client-side ports into the manager where it zeroed them
    (``newports=True``); never awaits. A port that must move is rewritten later."""
    km = provisioner.parent
    if km is None or not hasattr(km, "cleanup_random_ports"):
        return
    client: dict[str, Any] = dict(provisioner.connection_info)
    for name in PORT_NAMES:
        port = int(client.get(name) or 0)
        if port and getattr(km, name, None) == 0:
            setattr(km, name, port)


async def keep_or_move(provisioner: ClusterProvisioner, tunneled: bool) -> list[int]:
    """The ports the restarted kernel binds: its current ones, each taken one replaced
    by a fresh port recorded under the kernel's owner (the taken one's record goes).

    Raises :class:`ProvisionerError` when a port is taken and no free port is left.
    A check that cannot ask the engine keeps the ports (the start then says why).
    """
    runner = provisioner.engine
    current = list(runner.ports)
    if not current or not runner.needs_ports():
        return current
    host, owner = runner.port_host, runner.allocation_owner
    cache = ClusterPortCache.instance()
    try:
        taken = await runner.executor.run(
            taken_ports, current, host, runner.port_sources(), runner.binds_ports_here()
        )
    except ProvisionerError as exc:
        provisioner.log.debug(
            "Kernel %s: cannot check its ports for the restart: %s", provisioner.kernel_id, exc
        )
        return current
    if not taken:
        return current
    fresh = await runner.executor.run_or_undo(  # a cancel returns the fresh ports
        lambda ports: cache.release(owner, ports),
        cache.allocate,
        len(taken),
        owner,
        host=host,
        port_range=provisioner.port_range,
        sources=runner.port_sources(),
        fields={"kernelspec": provisioner.spec_name, "target": runner.target},
    )
    moved = dict(zip(taken, fresh, strict=True))
    await runner.executor.run(cache.release, owner, taken)
    ports = [moved.get(port, port) for port in current]
    provisioner.log.warning(
        "Kernel %s: port(s) %s on %s taken at restart; the kernel moves to %s (clients "
        "that kept their connection lose those channels until they reconnect)",
        provisioner.kernel_id,
        ", ".join(map(str, taken)),
        host,
        ", ".join(map(str, fresh)),
    )
    km = provisioner.parent
    if not tunneled and runner.reached_on_own_ports() and hasattr(km, "cleanup_random_ports"):
        for name, old, new in zip(PORT_NAMES, current, ports, strict=True):
            if old != new:
                setattr(km, name, new)  # where clients will reach it (never 0 meanwhile)
    return ports


def taken_ports(
    ports: Sequence[int], host: str, sources: Iterable[PortSource], bind_here: bool
) -> list[int]:
    """Which of ``ports`` a restarted kernel could not bind on ``host``; blocking.

    ``sources`` name what listens there; with ``bind_here`` (the kernel binds on this
    machine, ``host`` being :data:`LOCAL_HOST`) each port is also bind-tested.
    """
    listening: set[int] = set()
    for source in sources:
        listening |= source.ports_listening(host)
    taken = [port for port in ports if port in listening]
    if not bind_here or host != LOCAL_HOST:
        return taken
    deadline = time.monotonic() + RELEASE_GRACE
    while True:
        busy = [port for port in ports if port not in taken and not can_bind(port)]
        if not busy or time.monotonic() >= deadline:
            return sorted(taken + busy, key=list(ports).index)
        time.sleep(0.05)


def can_bind(port: int, addresses: Iterable[str] = BIND_ADDRESSES) -> bool:
    """True when a listener could bind ``port`` on every address as a kernel binds it
    (``SO_REUSEADDR``, as libzmq and docker-proxy set): only another socket bound to it
    counts, not a closed connection in TIME_WAIT."""
    for address in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True

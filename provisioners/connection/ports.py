"""A cluster-aware port cache.

Ports are handed out per *host* (``localhost``, a Kubernetes node, an SSH host, a
Docker daemon) from a configurable range. A port is never handed out twice while it
is held: threads share one lock, processes on one machine share a file-locked store in
the Jupyter runtime directory, and :class:`PortSource` objects add what an engine
itself knows (ports published by our containers, annotated on our pods, listening on
a remote host), so servers on different machines sharing one engine never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import random
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from ..exceptions import PortsExhaustedError, ProvisionerConfigError

#: Below Linux's default ephemeral range (32768-60999), so outgoing connections
#: never take a port we are about to publish.
DEFAULT_PORT_RANGE = "20000-29999"
LOCAL_HOST = "localhost"
STORE_FILENAME = "cluster-provisioners-ports.json"


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of TCP ports, written ``"LOW-HIGH"``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, *, key: str = "port_range") -> PortRange:
        """Parse ``"40000-40999"``; raise :class:`ProvisionerConfigError` naming ``key``."""
        low_text, sep, high_text = str(text).partition("-")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            low = high = -1
        if not sep or not (1024 <= low <= high <= 65535):
            msg = (
                f"{key}: {text!r} is not a port range; write 'LOW-HIGH' with "
                "1024 <= LOW <= HIGH <= 65535, e.g. '40000-40999'"
            )
            raise ProvisionerConfigError(msg, key=key)
        return cls(low, high)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.low, self.high + 1))

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


def _random_order(port_range: PortRange, excluded: Callable[[int], bool]) -> Iterator[int]:
    """The range's ports not ``excluded``, each once, in random order.

    Random probes come first, so a mostly free range costs a few draws instead of a
    shuffle of every port (a start's largest cost on a loaded machine); the rest follow
    shuffled, so a nearly full range is still searched to the end.
    """
    tried: set[int] = set()
    for _ in range(min(len(port_range), 64)):
        port = random.randint(port_range.low, port_range.high)
        if port not in tried:
            tried.add(port)
            if not excluded(port):
                yield port
    rest = [p for p in port_range if p not in tried and not excluded(p)]
    random.shuffle(rest)
    yield from rest


class PortSource(ABC):
    """An engine's own record of ports in use on a host (labels, annotations, sockets)."""

    @abstractmethod
    def ports_in_use(self, host: str) -> set[int]:
        """Return the ports known to be held on ``host``; may block (called in a thread)."""

    def ports_listening(self, host: str) -> set[int]:
        """The ports a new listener on ``host`` could not bind now (a restart checks its
        kernel's ports against them); may block. Default: all of :meth:`ports_in_use`."""
        return self.ports_in_use(host)


class LocalBindProbe:
    """Tells whether a port of this machine can be bound right now."""

    def __init__(self, bind_addresses: Iterable[str] = ("127.0.0.1", "0.0.0.0")) -> None:
        self.bind_addresses = tuple(bind_addresses)

    def is_free(self, port: int) -> bool:
        """True when every bind address accepts a listener on ``port``."""
        for address in self.bind_addresses:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    return False
        return True


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` from the state on (field 3), or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def process_start_time(pid: int) -> str:
    """The kernel's start tick of ``pid`` (guards against pid reuse), or '' if unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def process_alive(pid: int, start: str) -> bool:
    """True while ``pid`` runs and, with a known ``start`` tick, is still that process.

    A zombie (ended, not yet reaped) is not alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if not fields or len(fields) <= 19:
        return True  # no /proc: kill(0) is all we know
    if fields[0] in ("Z", "X"):
        return False
    return not start or fields[19] == start


@functools.lru_cache(maxsize=1)
def this_hostname() -> str:
    """This machine's name, as port records and owner labels carry it."""
    return socket.gethostname()


#: Called, under the store's lock, with the runtime dir and the records of dead holders
#: just dropped: what a target left with its ports (a local kernel process, its
#: connection file) is its own to remove (see :func:`on_reclaim`).
Reclaimer = Callable[[Path, list[dict[str, Any]]], None]
_RECLAIMERS: list[Reclaimer] = []


def on_reclaim(reclaimer: Reclaimer) -> None:
    """Register ``reclaimer`` for the records of dead holders (once per function)."""
    if reclaimer not in _RECLAIMERS:
        _RECLAIMERS.append(reclaimer)


class PortStore(ABC):
    """Where held ports are recorded. Implementations must be safe across processes."""

    @abstractmethod
    def allocate(
        self,
        host: str,
        count: int,
        owner: str,
        port_range: PortRange,
        taken: set[int],
        is_free: Callable[[int], bool] | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Atomically pick and record ``count`` ports for ``owner`` on ``host``, each record
        holding the JSON-safe ``fields`` too (kernelspec, target: what ``list`` shows)."""

    @abstractmethod
    def release(self, owner: str, ports: Iterable[int] | None = None) -> list[int]:
        """Forget ``owner``'s ports (all of them, or only ``ports``); return those freed."""

    @abstractmethod
    def held(self, host: str | None = None) -> dict[str, dict[int, dict[str, Any]]]:
        """Return live records: ``{host: {port: record}}``."""

    @abstractmethod
    def adopt(self, host: str, owner: str, ports: Iterable[int], **fields: Any) -> list[int]:
        """Record ``ports`` of ``owner`` on ``host`` as held by this process; return those
        another owner holds."""

    @abstractmethod
    def annotate(self, owner: str, **fields: Any) -> None:
        """Add JSON-safe ``fields`` to every record of ``owner`` (e.g. the kernel's pid)."""

    @abstractmethod
    def rename(self, owner: str, new_owner: str, **fields: Any) -> int:
        """Move every record of ``owner`` to ``new_owner`` (a claimed warm kernel), adding
        ``fields``; return how many moved."""


class FilePortStore(PortStore):
    """A JSON store guarded by ``flock``; records of dead processes are reclaimed."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory or jupyter_runtime_dir())
        self.path = self.directory / STORE_FILENAME
        self.lock_path = self.directory / (STORE_FILENAME + ".lock")

    @contextlib.contextmanager
    def _locked(self, spare: str = "") -> Iterator[dict[str, dict[str, dict[str, Any]]]]:
        """The store's data under the lock, dead holders' records reclaimed (but ``spare``'s)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            before = json.dumps(data, sort_keys=True)
            self._reclaim_dead(data, spare)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                self._write(data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a corrupt store is rebuilt; live holders are found by the sources
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict[str, dict[str, dict[str, Any]]]) -> None:
        data = {host: ports for host, ports in data.items() if ports}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def _reclaim_dead(self, data: dict[str, dict[str, dict[str, Any]]], spare: str = "") -> None:
        """Drop records of dead processes of this machine; the reclaimers (:func:`on_reclaim`)
        remove what their kernels left.

        Only records written on this machine (``hostname``) are judged: a runtime dir
        shared by several machines (NFS homes) holds other machines' records, whose
        processes cannot be checked here; they stay until their own machine reclaims them.
        """
        me = this_hostname()
        alive: dict[tuple[int, str], bool] = {}
        dropped: list[dict[str, Any]] = []
        for ports in data.values():
            for port, record in list(ports.items()):
                if record.get("hostname", me) != me or (spare and record.get("owner") == spare):
                    continue
                key = (int(record.get("pid", 0)), str(record.get("start", "")))
                if key not in alive:
                    alive[key] = key[0] > 0 and process_alive(*key)
                if not alive[key]:
                    dropped.append(record)
                    del ports[port]
        if dropped:
            for reclaimer in _RECLAIMERS:
                reclaimer(self.directory, dropped)

    def allocate(
        self,
        host: str,
        count: int,
        owner: str,
        port_range: PortRange,
        taken: set[int],
        is_free: Callable[[int], bool] | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> list[int]:
        record = {**(fields or {}), "owner": owner, **_holder(), "t": time.time()}
        with self._locked() as data:
            recorded = data.setdefault(host, {})
            chosen: list[int] = []
            for port in _random_order(port_range, lambda p: str(p) in recorded or p in taken):
                if is_free is None or is_free(port):
                    chosen.append(port)
                    if len(chosen) == count:
                        break
            if len(chosen) < count:
                msg = (
                    f"no {count} free ports left on host {host!r} in range {port_range} "
                    f"({len(recorded)} recorded as held); widen port_range or stop kernels"
                )
                raise PortsExhaustedError(msg)
            for port in chosen:
                recorded[str(port)] = dict(record)
            return chosen

    def release(self, owner: str, ports: Iterable[int] | None = None) -> list[int]:
        wanted = None if ports is None else {str(p) for p in ports}
        freed: list[int] = []
        with self._locked() as data:
            for recorded in data.values():
                for port, record in list(recorded.items()):
                    if record.get("owner") == owner and (wanted is None or port in wanted):
                        del recorded[port]
                        freed.append(int(port))
        return freed

    def adopt(self, host: str, owner: str, ports: Iterable[int], **fields: Any) -> list[int]:
        """Make this process the holder of ``owner``'s ``ports`` on ``host``.

        Existing records of ``owner`` (written by another, maybe dead, process) move to
        this process; missing ones are recorded again. Ports recorded for another owner
        are left alone and returned.
        """
        holder = {**_holder(), "t": time.time()}
        conflicts: list[int] = []
        with self._locked(spare=owner) as data:
            recorded = data.setdefault(host, {})
            for port in ports:
                record = recorded.get(str(port))
                if record is not None and record.get("owner") != owner:
                    conflicts.append(int(port))
                    continue
                record = recorded[str(port)] = dict(record or {"owner": owner})
                record.update(holder, **fields)
        return conflicts

    def annotate(self, owner: str, **fields: Any) -> None:
        with self._locked() as data:
            for ports in data.values():
                for record in ports.values():
                    if record.get("owner") == owner:
                        record.update(fields)

    def rename(self, owner: str, new_owner: str, **fields: Any) -> int:
        moved = 0
        with self._locked() as data:
            for ports in data.values():
                for record in ports.values():
                    if record.get("owner") == owner:
                        record.update(fields, owner=new_owner)
                        moved += 1
        return moved

    def held(self, host: str | None = None) -> dict[str, dict[int, dict[str, Any]]]:
        with self._locked() as data:
            return {
                h: {int(p): dict(r) for p, r in ports.items()}
                for h, ports in data.items()
                if ports and (host is None or h == host)
            }


def _holder() -> dict[str, Any]:
    """The record fields naming this process: machine, pid and the pid's start tick."""
    pid = os.getpid()
    return {"hostname": this_hostname(), "pid": pid, "start": process_start_time(pid)}


class ClusterPortCache:
    """Allocates ports per host from a store, consulting the engines' own records."""

    _instance: ClusterPortCache | None = None
    _instance_lock = threading.Lock()

    def __init__(self, store: PortStore | None = None) -> None:
        self.store = store or FilePortStore()
        self._lock = threading.Lock()
        self._local = LocalBindProbe()

    @classmethod
    def instance(cls) -> ClusterPortCache:
        """The process-wide cache over the default store in the Jupyter runtime dir."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def allocate(
        self,
        count: int,
        owner: str,
        *,
        host: str = LOCAL_HOST,
        port_range: PortRange | str = DEFAULT_PORT_RANGE,
        sources: Iterable[PortSource] = (),
        check_local_bind: bool | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Hand out ``count`` ports on ``host`` to ``owner``; blocking (use a thread).

        ``check_local_bind`` (default: ``host == 'localhost'``) also skips ports that
        some process of this machine is bound to. ``fields`` are recorded with the ports.
        """
        if isinstance(port_range, str):
            port_range = PortRange.parse(port_range)
        taken: set[int] = set()
        for source in sources:
            taken |= source.ports_in_use(host)
        if check_local_bind is None:
            check_local_bind = host == LOCAL_HOST
        is_free = self._local.is_free if check_local_bind else None
        with self._lock:
            return self.store.allocate(host, count, owner, port_range, taken, is_free, fields)

    def release(self, owner: str, ports: Iterable[int] | None = None) -> list[int]:
        """Return ``owner``'s ports (or only ``ports``) to the pool."""
        with self._lock:
            return self.store.release(owner, ports)

    def adopt(self, host: str, owner: str, ports: Iterable[int], **fields: Any) -> list[int]:
        """Take over ``owner``'s ``ports`` on ``host`` (a reattached kernel); return the
        ports another owner holds."""
        with self._lock:
            return self.store.adopt(host, owner, ports, **fields)

    def annotate(self, owner: str, **fields: Any) -> None:
        """Record ``fields`` with ``owner``'s ports (a local kernel's pid, for reclaiming)."""
        with self._lock:
            self.store.annotate(owner, **fields)

    def rename(self, owner: str, new_owner: str, **fields: Any) -> int:
        """Move ``owner``'s records to ``new_owner`` (a warm kernel claimed under its id)."""
        with self._lock:
            return self.store.rename(owner, new_owner, **fields)

    def held(self, host: str | None = None) -> dict[str, dict[int, dict[str, Any]]]:
        """Live records per host (dead holders already reclaimed)."""
        with self._lock:
            return self.store.held(host)


def port_is_listening(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def zmq_listens(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a ZMQ socket answers on ``host:port``: its greeting starts with 0xFF.

    A bare TCP connect is not enough where a proxy (docker-proxy, a port-forward)
    accepts connections before the kernel has bound its port.
    """
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        first = await asyncio.wait_for(reader.read(1), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return first == b"\xff"

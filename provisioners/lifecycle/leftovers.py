"""What a cleanup could not remove, kept and retried until the engine lets it go.

When an engine refuses or cannot be reached while a kernel is cleaned up (Docker daemon
restarting, Kubernetes API answering 403 or 5xx, SSH host dropping), the provisioner
keeps what it knows of the kernel's resources (container id, pod name, remote pid and
directory) and its port records, and is recorded here. Every recorded kernel is retried
on its event loop every ``cleanup_retry_interval`` seconds, and at once when another
kernel starts or :func:`reconcile` is called, until its removal succeeds; only then are
its ports returned. If the server dies first, its records are reclaimed as any dead
server's are (the port store and each engine's orphan sweep).

A removal the engine accepted but has not finished (a Kubernetes pod still terminating,
which takes a real kubelet up to a minute for a pod stuck in an image pull) is recorded
the same way: the hook raises :class:`RemovalPending`, the kernel's error or shutdown is
reported at once, and the retry waits for the confirmation every
:data:`CONFIRM_INTERVAL` seconds. Should the server stop meanwhile, the engine finishes
that removal by itself (it was accepted; a Kubernetes Secret is deleted with its pod)
and the port records go with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..exceptions import ProvisionerError

if TYPE_CHECKING:
    from .base import ClusterProvisioner

#: Seconds between two checks of a removal the engine accepted but has not confirmed.
CONFIRM_INTERVAL = 1.0


class RemovalPending(ProvisionerError):
    """Raised by ``remove_kernel`` when the engine accepted the removal but has not
    finished it: the kernel stays recorded, with its ports, until the engine confirms
    (retried every :data:`CONFIRM_INTERVAL` s), and the base logs no failure."""


@dataclass
class _Entry:
    provisioner: ClusterProvisioner
    loop: asyncio.AbstractEventLoop
    next_try: float


_ENTRIES: dict[int, _Entry] = {}
_TASKS: dict[asyncio.AbstractEventLoop, tuple[asyncio.Task[None], asyncio.Event]] = {}
_LOCK = threading.Lock()


def record(provisioner: ClusterProvisioner, delay: float | None = None) -> None:
    """Keep ``provisioner`` (whose removal failed or is not confirmed yet) and retry it
    on the running loop in ``delay`` seconds (default: its ``cleanup_retry_interval``)."""
    loop = asyncio.get_running_loop()
    if delay is None:
        delay = provisioner.cleanup_retry_interval
    due = time.monotonic() + delay
    with _LOCK:
        entry = _ENTRIES.get(id(provisioner))
        if entry is not None and entry.provisioner is provisioner and entry.loop is loop:
            entry.next_try = due
        else:
            _ENTRIES[id(provisioner)] = _Entry(provisioner, loop, due)
    _ensure_task(loop).set()


def discard(provisioner: ClusterProvisioner) -> None:
    """Forget ``provisioner``: its resources are gone."""
    with _LOCK:
        _ENTRIES.pop(id(provisioner), None)


def pending() -> list[ClusterProvisioner]:
    """The provisioners whose resources are still left, in this process.

    Those of an event loop that was closed are dropped: nothing can retry them there
    (their port records go with this process, their resources with the orphan sweep).
    """
    with _LOCK:
        for key in [k for k, e in _ENTRIES.items() if e.loop.is_closed()]:
            del _ENTRIES[key]
        return [entry.provisioner for entry in _ENTRIES.values()]


def hurry() -> None:
    """Retry every leftover of the running loop now (another kernel is starting)."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        ours = [e for e in _ENTRIES.values() if e.loop is loop]
        for entry in ours:
            entry.next_try = 0.0
    if ours:
        _ensure_task(loop).set()


async def reconcile() -> list[str]:
    """Retry every leftover of the running loop now; return the kernel ids still left."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        ours = [e.provisioner for e in _ENTRIES.values() if e.loop is loop]
    for provisioner in ours:
        await provisioner.retry_removal()
    with _LOCK:
        return [e.provisioner.kernel_id for e in _ENTRIES.values() if e.loop is loop]


def _ensure_task(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """The retry task of ``loop`` (started if needed); setting its event wakes it."""
    with _LOCK:
        running = _TASKS.get(loop)
        if running is not None and not running[0].done():
            return running[1]
        wake = asyncio.Event()
        task = loop.create_task(_retry_loop(loop, wake), name="cluster-provisioners-leftovers")
        _TASKS[loop] = (task, wake)
        return wake


async def _retry_loop(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
    """Retry each due leftover of ``loop`` until none is left."""
    while True:
        with _LOCK:
            ours = [e for e in _ENTRIES.values() if e.loop is loop]
            if not ours:
                del _TASKS[loop]
                return
        now = time.monotonic()
        for entry in ours:
            if entry.next_try <= now:
                # a failure records it again with its next try (see ``record``)
                entry.next_try = time.monotonic() + entry.provisioner.cleanup_retry_interval
                with contextlib.suppress(Exception):
                    await entry.provisioner.retry_removal()
        with _LOCK:
            ours = [e for e in _ENTRIES.values() if e.loop is loop]
        if not ours:
            continue
        delay = min(e.next_try for e in ours) - time.monotonic()
        wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), max(0.05, min(delay, 60.0)))

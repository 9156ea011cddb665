"""One docker-py client per daemon, shared by every kernel of this process, and the
state of our containers as the daemon's event stream reports it.

A kernel's engine takes the client of its daemon with :meth:`SharedDaemon.acquire` and
gives it back with :meth:`SharedDaemon.release`; the last release closes it, so one
kernel's shutdown never closes the client under another. Each shared client of a daemon
reached over a socket (not ``ssh://``) runs one ``docker events`` stream in a thread of
its own, filtered to our containers' ``start``, ``die``, ``destroy`` and ``oom`` events:
:meth:`SharedDaemon.cached_state` answers a poll from it, without an API call. A
container is vouched for only once the stream was up before it was inspected (or since
one of its events came), and only while that same stream stays up: after a break every
container is inspected once more (:meth:`begin_check`, :meth:`end_check`), and while the
stream is down every poll inspects, as without it. On a remote daemon each container is
inspected again every ``RECHECK`` seconds all the same: a stream to it can die silently
(a NAT or firewall dropping an idle connection), and would then miss a death for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import docker

from ..connection.sshconnect import SSHSettings
from .daemon import (
    ENGINE_ERRORS,
    LABEL_KERNEL_ID,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    connect_docker,
    is_local_daemon,
)

log = logging.getLogger(__name__)

#: The container events that change what a poll answers (``oom`` is only logged).
WATCHED_EVENTS = ("start", "die", "destroy", "oom")
#: Seconds of events the daemon replays when the stream (re)connects: the daemon
#: subscribes a stream only after it sent the response's headers.
_REPLAY = 5
#: Seconds between attempts to reopen a broken stream (doubling up to the last).
_RETRY = (0.5, 5.0)
#: Seconds a remote daemon's container's state is answered from the stream before it is
#: inspected again (a local daemon's stream cannot die silently).
RECHECK = 60.0


@dataclass
class _Known:
    """What the stream (or an inspect vouched for by it) says of one container."""

    generation: int = 0  # the stream it holds for (0: none; inspect first)
    running: bool = True
    code: int = 0  # exit code once stopped; -1 once gone
    events: int = 0  # events seen for it
    checked: float = 0.0  # time.monotonic() of its last inspect or event


class SharedDaemon:
    """The docker-py client of one daemon (and client settings), with its event cache.

    Get one with :meth:`acquire` (blocking: call it in a thread) and give it back with
    :meth:`release`. Thread-safe.
    """

    _registry: dict[tuple[Any, ...], SharedDaemon] = {}
    _registry_lock = threading.Lock()

    def __init__(self, key: tuple[Any, ...], client: docker.DockerClient, events: bool) -> None:
        self.key = key
        self.client = client
        self.closed = False
        self._refs = 0
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        self._generation = 0
        self._up = False
        self._stream: Any = None
        self._stop = threading.Event()
        self._recheck = float("inf") if is_local_daemon(key[0]) else RECHECK
        self._watcher: threading.Thread | None = None
        if events:
            self._watcher = threading.Thread(target=self._watch, name="docker-events", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ sharing

    @classmethod
    def acquire(
        cls,
        docker_host: str,
        *,
        timeout: float,
        connect_timeout: float,
        ssh: SSHSettings | None = None,
    ) -> SharedDaemon:
        """The shared client of ``docker_host`` ('' for DOCKER_HOST or the local socket)
        with these timeouts, connected on first use. Raises
        :class:`~provisioners.exceptions.EngineUnavailableError` as :func:`connect_docker`.
        """
        where = docker_host or os.environ.get("DOCKER_HOST", "")
        key = (where, timeout, connect_timeout, ssh.link_key() if ssh is not None else None)
        with cls._registry_lock:
            shared = cls._registry.get(key)
            if shared is not None:
                shared._refs += 1
                return shared
        client = connect_docker(
            docker_host, timeout=timeout, connect_timeout=connect_timeout, ssh=ssh
        )
        with cls._registry_lock:
            shared = cls._registry.get(key)
            if shared is None:
                events = not where.startswith("ssh://")  # docker-py cannot cancel its streams
                shared = cls._registry[key] = cls(key, client, events)
                client = None
            shared._refs += 1
        if client is not None:  # another thread connected first: use its client
            client.close()
        return shared

    def release(self) -> None:
        """Drop one reference; the last one stops the event stream and closes the client."""
        with SharedDaemon._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            if SharedDaemon._registry.get(self.key) is self:
                del SharedDaemon._registry[self.key]
            self.closed = True
        self._stop.set()
        with self._lock:
            stream, self._stream, self._up = self._stream, None, False
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(Exception):
            self.client.close()

    def invalidate(self) -> None:
        """The daemon did not answer: the next :meth:`acquire` connects a new client
        (an ``ssh://`` transport does not come back by itself); this one stays open for
        those holding it."""
        with SharedDaemon._registry_lock:
            if SharedDaemon._registry.get(self.key) is self:
                del SharedDaemon._registry[self.key]

    @classmethod
    def active(cls) -> list[SharedDaemon]:
        """The shared clients that new kernels would get."""
        with cls._registry_lock:
            return list(cls._registry.values())

    @property
    def users(self) -> int:
        """How many hold this client."""
        with SharedDaemon._registry_lock:
            return self._refs

    @property
    def streaming(self) -> bool:
        """True while the event stream is up."""
        with self._lock:
            return self._up

    # ------------------------------------------------------------------ the cache

    def cached_state(self, container_id: str) -> tuple[bool, int] | None:
        """``(running, exit code)`` of the container as the stream vouches for it, or None
        when it must be inspected (see :meth:`begin_check`)."""
        with self._lock:
            known = self._known.get(container_id)
            if not self._up or known is None or known.generation != self._generation:
                return None
            if time.monotonic() - known.checked > self._recheck:
                return None
            return known.running, known.code

    def begin_check(self, container_id: str) -> tuple[int, int] | None:
        """Before inspecting the container: watch it from now on; the token for
        :meth:`end_check` (None while the stream is down)."""
        with self._lock:
            known = self._known.setdefault(container_id, _Known())
            return (self._generation, known.events) if self._up else None

    def end_check(
        self, container_id: str, token: tuple[int, int] | None, running: bool, code: int
    ) -> None:
        """The inspect's answer: it holds for as long as the stream that was up before it
        stays up, unless an event came meanwhile (that one is as new, and holds)."""
        if token is None:
            return
        with self._lock:
            known = self._known.get(container_id)
            if known is None or not self._up or self._generation != token[0]:
                return
            if known.events == token[1]:
                known.running, known.code, known.generation = running, code, token[0]
                known.checked = time.monotonic()

    def forget(self, container_id: str) -> None:
        """Stop watching a container (removed, or no longer this kernel's)."""
        with self._lock:
            self._known.pop(container_id, None)

    # ------------------------------------------------------------------ the stream

    def _watch(self) -> None:
        """Keep one event stream open while the client is shared; record its events."""
        delay = _RETRY[0]
        filters = {
            "type": ["container"],
            "label": [f"{LABEL_MANAGED_BY}={MANAGED_BY}"],
            "event": list(WATCHED_EVENTS),
        }
        while not self._stop.is_set():
            try:
                stream = self.client.api.events(
                    since=int(time.time()) - _REPLAY, filters=filters, decode=True
                )
            except ENGINE_ERRORS as exc:
                log.debug("Docker events of %s: cannot listen: %s", self.key[0] or "(local)", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, _RETRY[1])
                continue
            with self._lock:
                stopped = self._stop.is_set()
                if not stopped:
                    self._stream, self._up = stream, True
                    self._generation += 1
            if stopped:  # released while it connected: nobody else closes this one
                with contextlib.suppress(Exception):
                    stream.close()
                return
            delay = _RETRY[0]
            try:
                for event in stream:
                    self._record(event)
            except Exception as exc:  # any break of the stream: inspect until it is back
                log.debug("Docker events of %s: stream ended: %s", self.key[0] or "(local)", exc)
            finally:
                with self._lock:
                    self._up, self._stream = False, None
                with contextlib.suppress(Exception):
                    stream.close()
            self._stop.wait(delay)

    def _record(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id") or ""
        action = str(event.get("Action") or event.get("status") or "")
        attributes = actor.get("Attributes") or {}
        with self._lock:
            known = self._known.get(container_id)
            if known is None:
                return
            if action == "oom":
                kernel_id = attributes.get(LABEL_KERNEL_ID, "?")
                log.warning(
                    "Kernel %s: container %s ran out of memory", kernel_id, container_id[:12]
                )
                return
            if action == "start":
                known.running, known.code = True, 0
            elif action == "die":
                try:
                    known.running, known.code = False, int(attributes.get("exitCode", 0))
                except ValueError:
                    known.running, known.code = False, 1
            elif action == "destroy":
                known.running, known.code = False, -1
            else:
                return
            known.events += 1
            known.generation, known.checked = self._generation, time.monotonic()

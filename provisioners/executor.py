"""A bounded thread pool per engine, so that one sick engine never stalls the others.

Blocking engine calls (docker-py, paramiko, the port store) run in threads. Sharing
asyncio's default executor (``asyncio.to_thread``: a handful of threads on a small
machine) lets one frozen SSH host or hung Docker daemon take every thread and stall
unrelated kernels. Each engine names its own :class:`EngineExecutor` instead, in one
place: ``LOCAL_EXECUTOR`` in :mod:`provisioners.local`, ``DOCKER_EXECUTOR`` in
:mod:`provisioners.docker.engine`, ``SSH_EXECUTOR`` in
:mod:`provisioners.connection.sshlink` (the SSH target and every SSH tunnel),
``KUBERNETES_EXECUTOR`` in the :mod:`provisioners.k8s` package, and each
provisioner class exposes its engine's as ``executor``. Calls beyond an engine's bound
wait for that engine only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["EngineExecutor"]

P = ParamSpec("P")
T = TypeVar("T")


class EngineExecutor:
    """At most ``max_workers`` threads for one engine's blocking calls, made on demand.

    The pool is created on first use (and again in a forked child); its threads are
    named ``<name>-engine_<n>``.
    """

    def __init__(self, name: str, max_workers: int = 8) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.name = name
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        """This engine's thread pool."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.max_workers, f"{self.name}-engine")
                self._pid = os.getpid()
            return self._pool

    def submit(
        self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        """Start ``func(*args, **kwargs)`` in this engine's pool, with the caller's context."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self.pool(), call)

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await`` ``func(*args, **kwargs)`` run in this engine's pool."""
        return await self.submit(func, *args, **kwargs)

    async def run_or_undo(
        self,
        undo: Callable[[T], object],
        func: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """:meth:`run` for a call that creates something (a port allocation): when the
        caller is cancelled, the call still ends in its thread and ``undo`` gets its result."""
        lock, state = threading.Lock(), {"abandoned": False, "done": False}
        result: list[T] = []

        def call() -> T:
            value = func(*args, **kwargs)
            with lock:
                state["done"], abandoned = True, state["abandoned"]
                result.append(value)
            if abandoned:
                undo(value)
            return value

        try:
            return await asyncio.shield(self.submit(call))
        except asyncio.CancelledError:
            with lock:
                state["abandoned"], done = True, state["done"]
            if done:  # it ended as the caller was cancelled: undo it here
                self.pool().submit(undo, result[0])
            raise

    def shutdown(self) -> None:
        """Cancel queued calls and let the threads end (running calls finish on their own)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"<EngineExecutor {self.name} max_workers={self.max_workers}>"

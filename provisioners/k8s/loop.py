"""Where the Kubernetes engine runs: its own event loop (one thread per process), and
``KUBERNETES_EXECUTOR`` for its few blocking calls (the port store).

Everything of the Kubernetes target that talks to the API runs on this loop: the shared
API client (its aiohttp session), every request and websocket, the pod reflectors (the
watches that keep the pod cache current) and the port-forward listeners and relays.
Those must keep running between the caller's calls: jupyter_client's synchronous
``KernelManager`` runs its event loop only during a call (``run_sync``) and a blocking
client never runs one, so a relay on the caller's loop would stand still while the
client waits for the kernel's answer.

The loop starts lazily with its first user (:meth:`EngineLoop.hold`) and stops when the
last one lets go (:meth:`EngineLoop.release`), or at interpreter exit. A caller on any
event loop hands a coroutine over with :meth:`EngineLoop.run` (cancelling the caller
cancels it there, and waits until it has ended); the provisioner's hooks do so through
:func:`on_engine_loop`; a plain thread uses :meth:`EngineLoop.call`. Nothing blocks the
caller's loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

from ..executor import EngineExecutor

T = TypeVar("T")
P = ParamSpec("P")

#: The Kubernetes target's threads, for the few blocking calls it makes (the port store):
#: its API calls are asynchronous and run on the engine loop.
KUBERNETES_EXECUTOR = EngineExecutor("kubernetes", max_workers=4)

#: Name of the loop's thread (a prefix: a restarted loop gets a new thread).
THREAD_NAME = "k8s-engine-loop"

log = logging.getLogger(__name__)


class EngineLoop:
    """An event loop running in a daemon thread of its own, shared by its users."""

    _current: ClassVar[EngineLoop | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _exit_hook: ClassVar[bool] = False

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.users: set[int] = set()
        self.pid = os.getpid()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=THREAD_NAME, daemon=True)
        self.thread.start()
        self._ready.wait()

    # ------------------------------------------------------------------ who uses it

    @classmethod
    def hold(cls, user: object) -> EngineLoop:
        """The process's engine loop (started if needed), held for ``user``."""
        with cls._lock:
            engine = cls._current
            if engine is None or engine.pid != os.getpid() or not engine.thread.is_alive():
                engine = cls._current = cls()
                if not cls._exit_hook:
                    atexit.register(cls.shutdown)
                    cls._exit_hook = True
            engine.users.add(id(user))
            return engine

    @classmethod
    def holders(cls) -> set[int]:
        """Ids of the users holding the current loop (for checks and tests)."""
        with cls._lock:
            engine = cls._current
            return set(engine.users) if engine is not None else set()

    def release(self, user: object) -> None:
        """Drop ``user``'s hold; the last one stops the loop (without waiting for it)."""
        with self._lock:
            self.users.discard(id(user))
            if self.users or self.pid != os.getpid():
                return
            if type(self)._current is self:
                type(self)._current = None
        self._request_stop()

    @classmethod
    def shutdown(cls, timeout: float = 5.0) -> None:
        """Stop the current loop and wait for its thread (at exit, or in tests)."""
        with cls._lock:
            engine, cls._current = cls._current, None
        if engine is not None and engine.pid == os.getpid():
            engine._request_stop()
            engine.thread.join(timeout)

    # ------------------------------------------------------------------ handing work over

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the engine loop, from any caller's loop.

        Cancelling the caller cancels ``coro`` there and waits until it has ended, so
        whatever the caller does next (a cleanup after a timeout) never overlaps with it.
        """
        if self.in_loop_thread:
            return await coro
        finished: concurrent.futures.Future[tuple[bool, Any]] = concurrent.futures.Future()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            tasks.append(task)
            task.add_done_callback(lambda t: _report(t, finished))

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed (interpreter exit)
            coro.close()
            raise
        waiter = asyncio.wrap_future(finished)
        try:
            ok, value = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            self.loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(waiter), 30)
            raise
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run the plain function ``fn`` on the engine loop and return its result (blocking)."""
        if self.in_loop_thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def step() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        self.loop.call_soon_threadsafe(step)
        return future.result(timeout)

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self._drain())
        finally:
            self.loop.close()

    def _request_stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _drain(self) -> None:
        """Close the shared API clients, then cancel and await what is left."""
        from .client import close_clients

        try:
            await asyncio.wait_for(close_clients(), 5)
        except Exception as exc:
            log.debug("Closing the Kubernetes clients at loop stop: %r", exc)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.loop.shutdown_asyncgens()


def _report(task: asyncio.Task[Any], finished: concurrent.futures.Future[tuple[bool, Any]]) -> None:
    """Hand ``task``'s outcome to the caller's side as (ok, result or exception)."""
    if task.cancelled():
        outcome: tuple[bool, Any] = (False, asyncio.CancelledError())
    elif task.exception() is not None:
        outcome = (False, task.exception())
    else:
        outcome = (True, task.result())
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # the caller gave up
        finished.set_result(outcome)


class EngineUser(Protocol):
    """What :func:`on_engine_loop` needs: a way to await a coroutine on the engine loop."""

    async def _on_engine(self, coro: Coroutine[Any, Any, T]) -> T: ...


U = TypeVar("U", bound=EngineUser)


def on_engine_loop(
    method: Callable[Concatenate[U, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[U, P], Coroutine[Any, Any, T]]:
    """Run the decorated (provisioner hook) coroutine on the engine loop, whatever loop
    the caller (jupyter_client, sync or async) awaits it from."""

    @functools.wraps(method)
    async def on_engine(self: U, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._on_engine(method(self, *args, **kwargs))

    return on_engine

"""An event loop in a daemon thread of its own, shared by the users that hold it.

jupyter_client's synchronous ``KernelManager`` runs an event loop only during a call
(``run_sync``) and a blocking client never runs one: work that must go on between the
caller's calls (Kubernetes watches and port-forward relays, a warm-kernel pool that
refills) runs on such a loop instead. It starts with its first user (:meth:`hold`) and
stops when the last one lets go (:meth:`release`), or at interpreter exit. A caller on
any event loop hands a coroutine over with :meth:`run` (cancelling the caller cancels it
there, and waits until it has ended); a plain thread uses :meth:`call`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Self, TypeVar, cast

T = TypeVar("T")

log = logging.getLogger(__name__)


class LoopThread:
    """An event loop running in a daemon thread of its own, shared by its users.

    A subclass names its thread (``thread_name``), keeps its own ``_current`` and
    ``_exit_hook`` and may close what it shares in :meth:`close_resources`.
    """

    thread_name: ClassVar[str] = "loop-thread"

    _current: ClassVar[LoopThread | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _exit_hook: ClassVar[bool] = False

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.users: set[int] = set()
        self.pid = os.getpid()
        #: Set on the loop thread once the loop stopped running work (it drains, then
        #: closes): work handed over from then on is refused, never left pending.
        self._stopped = False
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self.thread.start()
        self._ready.wait()

    # ------------------------------------------------------------------ who uses it

    @classmethod
    def hold(cls, user: object) -> Self:
        """The process's engine loop (started if needed), held for ``user``."""
        with cls._lock:
            engine = cls._current
            if engine is None or engine.pid != os.getpid() or not engine.thread.is_alive():
                engine = cls._current = cls()
                if not cls._exit_hook:
                    atexit.register(cls.shutdown)
                    cls._exit_hook = True
            engine.users.add(id(user))
            return cast(Self, engine)

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
            if self._stopped:  # the loop drains and closes: a task now would never end
                coro.close()
                error = RuntimeError(f"{self.thread_name} stopped")
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    finished.set_result((False, error))
                return
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

    async def close_resources(self) -> None:
        """Close what the loop's users share (runs on the loop as it stops)."""

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
            self._stopped = True
            self.loop.run_until_complete(self._drain())
        finally:
            self.loop.close()

    def _request_stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _drain(self) -> None:
        """Close the shared resources, then cancel and await what is left."""
        try:
            await asyncio.wait_for(self.close_resources(), 5)
        except Exception as exc:
            log.debug("Closing %s's resources at loop stop: %r", self.thread_name, exc)
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

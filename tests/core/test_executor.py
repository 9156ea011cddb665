"""Engine executors: bounded, apart from each other and from asyncio's default pool."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading

from provisioners.executor import EngineExecutor

REQUEST = contextvars.ContextVar("REQUEST", default="")


async def test_a_saturated_engine_leaves_the_others_free() -> None:
    sick, healthy = EngineExecutor("sick", max_workers=2), EngineExecutor("healthy", 2)
    release = threading.Event()
    try:
        stuck = [sick.submit(release.wait, 30) for _ in range(5)]  # 2 run, 3 queue
        assert await asyncio.wait_for(healthy.run(threading.current_thread), 5) is not None
        names = {t.name for t in threading.enumerate() if t.name.startswith("sick-engine")}
        assert len(names) == 2  # bounded
        assert not any(f.done() for f in stuck)
    finally:
        release.set()
    assert await asyncio.wait_for(asyncio.gather(*stuck), 10) == [True] * 5
    sick.shutdown()
    healthy.shutdown()


async def test_calls_keep_the_callers_context() -> None:
    executor = EngineExecutor("context", max_workers=1)
    REQUEST.set("kernel-42")
    assert await executor.run(REQUEST.get) == "kernel-42"
    executor.shutdown()


async def test_a_cancelled_allocation_is_undone_once_it_ends() -> None:
    executor = EngineExecutor("undo", max_workers=1)
    started, release, undone = threading.Event(), threading.Event(), []

    def allocate() -> list[int]:
        started.set()
        release.wait(10)
        return [20001, 20002]

    task = asyncio.ensure_future(executor.run_or_undo(undone.append, allocate))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()  # the caller gives up while the allocation runs in its thread
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert undone == []
    release.set()
    for _ in range(100):
        if undone:
            break
        await asyncio.sleep(0.05)
    assert undone == [[20001, 20002]]
    assert await executor.run_or_undo(undone.append, lambda: 7) == 7  # not cancelled: kept
    assert len(undone) == 1
    executor.shutdown()

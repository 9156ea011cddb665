"""Engine executors: bounded, apart from each other and from asyncio's default pool."""

from __future__ import annotations

import asyncio
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

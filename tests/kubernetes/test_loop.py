"""The engine loop (provisioners.k8s.loop): handing work over, cancelling it, stopping."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from provisioners.k8s.loop import THREAD_NAME, EngineLoop

pytestmark = pytest.mark.timeout(60)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


async def _where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_one_loop_for_callers_on_any_loop_and_it_stops_with_its_last_user() -> None:
    users = [object(), object()]
    engine = EngineLoop.hold(users[0])
    assert EngineLoop.hold(users[1]) is engine

    def caller() -> str:
        return asyncio.run(engine.run(_where()))

    with ThreadPoolExecutor(2) as pool:
        names = list(pool.map(lambda _: caller(), range(4)))
    assert names == [engine.thread.name] * 4
    assert engine.call(lambda: threading.current_thread().name) == engine.thread.name

    engine.release(users[0])
    assert engine.thread.is_alive()
    engine.release(users[1])
    engine.thread.join(5)
    assert not engine.thread.is_alive()
    assert engine.loop.is_closed()
    fresh = EngineLoop.hold(users[0])
    assert fresh is not engine and fresh.thread.is_alive()
    fresh.release(users[0])
    fresh.thread.join(5)
    assert engine_threads() == []


def test_the_engine_keeps_running_between_calls_and_errors_come_back() -> None:
    user = object()
    engine = EngineLoop.hold(user)
    try:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        engine.call(lambda: engine.loop.create_task(ticker()))
        time.sleep(0.5)  # no caller runs any loop meanwhile
        assert len(ticks) >= 5

        async def fails() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            asyncio.run(engine.run(fails()))
    finally:
        engine.release(user)
        engine.thread.join(5)
    assert not engine.thread.is_alive()  # the ticker was cancelled at stop


def test_cancelling_the_caller_cancels_the_work_and_waits_for_its_end() -> None:
    user = object()
    engine = EngineLoop.hold(user)
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # cleanup that takes a while
            events.append(f"cleaned up on {threading.current_thread().name}")
            raise

    async def caller() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.run(slow()), 0.2)
        events.append("caller resumed")

    try:
        asyncio.run(caller())
    finally:
        engine.release(user)
        engine.thread.join(5)
    assert events == [f"cleaned up on {engine.thread.name}", "caller resumed"]


def test_a_process_exiting_with_the_loop_held_stops_it_cleanly() -> None:
    """At interpreter exit the loop's tasks are cancelled and awaited, then it closes."""
    script = """
import asyncio, time
from provisioners.k8s.loop import EngineLoop

async def relay():
    try:
        await asyncio.sleep(3600)
    finally:
        print("relay closed", flush=True)

engine = EngineLoop.hold(object())
engine.call(lambda: engine.loop.create_task(relay()))
time.sleep(0.2)
print("exiting", flush=True)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["exiting", "relay closed"]
    assert done.stderr == ""

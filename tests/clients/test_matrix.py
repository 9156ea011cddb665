"""The client conformance matrix: every client on every target, one table.

For each target (local, Docker, SSH on the tests' sshd, Kubernetes on the API double or
``$KUBECONFIG``) and each client of :mod:`tests.clients.drivers` (blocking, async,
multi-kernel manager, Jupyter Server over REST + websocket, nbclient), one kernel is
started and every step runs on it: execute (stdout, stderr, display data, a result),
complete, inspect, interrupt a busy loop, restart, shut down. Afterwards nothing may be
left: nothing of the kernel on the engine (process, container, pod, Secret, remote
kernel dir), no record of its ports in the port cache, nothing listening on the ports the
client used, and no thread of ours (tunnels, relays) still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import FilePortStore
from tests.clients.drivers import DRIVERS, Driver, ServerDriver
from tests.helpers import LEFTOVER_WAIT, write_kernelspec
from tests.jupyter_server import JupyterServer, Output
from tests.targets import TargetCase, resolve

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")

CODE = """\
import sys
from IPython.display import display
matrix_value = 42
print("out-1")
print("err-1", file=sys.stderr)
display({"text/plain": "disp-1"}, raw=True)
matrix_value * 2
"""


@pytest.mark.parametrize("client", list(DRIVERS))
async def test_client_on_target(
    target: TargetCase, client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cell = f"{client} x {target.name}"
    spec_name = f"matrix-{target.name}"
    jupyter_path = tmp_path / "data"  # where JupyterServer(tmp_path) looks
    ksm = write_kernelspec(
        jupyter_path / "kernels", spec_name, target.provisioner, target.config, argv=target.argv
    )
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))  # nbclient and the server
    threads_before = set(threading.enumerate())

    async with _driver(client, spec_name, ksm, tmp_path) as driver:
        await _run_steps(driver, cell)
        info = driver.connection_info()
        async with _step(cell, "shutdown"):
            await driver.shutdown()
        problems = await _leftovers(target, driver.kernel_id, info, threads_before)
        assert not problems, f"[{cell}] left behind after shutdown: {problems}"


async def _run_steps(driver: Driver, cell: str) -> None:
    async with _step(cell, "start"):
        await driver.start()
    async with _step(cell, "execute"):
        out = await driver.execute(CODE)
        assert out.status == "ok", out
        assert out.stdout == "out-1\n", out
        assert "err-1" in out.stderr, out
        assert {"text/plain": "disp-1"} in out.display, out
        assert {"text/plain": "84"} in out.display, out
    async with _step(cell, "complete"):
        reply = await driver.request("complete_request", code="matrix_va", cursor_pos=9)
        assert reply["status"] == "ok", reply
        assert "matrix_value" in reply["matches"], reply
    async with _step(cell, "inspect"):
        reply = await driver.request(
            "inspect_request", code="matrix_value", cursor_pos=12, detail_level=0
        )
        assert reply["status"] == "ok" and reply["found"], reply
        assert "int" in reply["data"]["text/plain"], reply
    async with _step(cell, "interrupt"):
        out = await driver.interrupt_busy_loop()
        assert out.status == "error" and out.ename == "KeyboardInterrupt", out
        _expect_stdout(await driver.execute("print('alive')"), "alive\n")
    async with _step(cell, "restart"):
        await driver.restart()
        _expect_stdout(await driver.execute("print('matrix_value' in dir())"), "False\n")


def _expect_stdout(out: Output, text: str) -> None:
    assert out.status == "ok" and out.stdout == text, out


@contextlib.asynccontextmanager
async def _step(cell: str, name: str) -> AsyncIterator[None]:
    """Name the cell and the step in whatever fails inside."""
    try:
        yield
    except Exception as exc:
        msg = f"[{cell}] step {name!r} failed: {type(exc).__name__}: {exc}"
        raise AssertionError(msg) from exc


@contextlib.asynccontextmanager
async def _driver(client: str, spec_name: str, ksm: Any, tmp_path: Path) -> AsyncIterator[Driver]:
    """The client's driver (with its Jupyter Server for ``server``); whatever a failed
    test left running is stopped on the way out (after the leftover checks)."""
    with contextlib.ExitStack() as stack:
        if DRIVERS[client] is ServerDriver:
            # This checkout's provisioners, and this test's Jupyter paths (kernelspecs,
            # runtime dir, and so the port cache's store).
            server = stack.enter_context(JupyterServer(tmp_path))
            driver: Driver = ServerDriver(spec_name, ksm, server)
        else:
            driver = DRIVERS[client](spec_name, ksm)
        try:
            yield driver
        finally:
            await driver.close()


async def _leftovers(
    target: TargetCase,
    kernel_id: str,
    info: dict[str, Any],
    threads_before: set[threading.Thread],
) -> list[str]:
    """What is still there of the kernel, waiting up to :data:`LEFTOVER_WAIT` for the
    engine and the threads to finish letting go."""
    checks: list[Callable[[], Awaitable[list[str]]]] = [
        lambda: _on_engine(target, kernel_id),
        lambda: _port_records(kernel_id),
        lambda: _listening(info),
        lambda: _our_threads(threads_before),
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEFTOVER_WAIT
    while True:
        found = [item for check in checks for item in await check()]
        if not found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.5)


async def _on_engine(target: TargetCase, kernel_id: str) -> list[str]:
    return list(await resolve(target.leftovers(kernel_id)))


async def _port_records(kernel_id: str) -> list[str]:
    held = await asyncio.to_thread(FilePortStore().held)
    return [
        f"port record {host}:{port} ({record.get('owner')})"
        for host, ports in held.items()
        for port, record in ports.items()
        if kernel_id in str(record.get("owner", ""))
    ]


async def _listening(info: dict[str, Any]) -> list[str]:
    """The ports the client connected to that still accept connections."""
    ip = info.get("ip") or "127.0.0.1"
    ip = "127.0.0.1" if ip in ("0.0.0.0", "localhost") else ip

    def accepts(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex((ip, port)) == 0

    found = []
    for name in PORT_NAMES:
        port = int(info.get(name) or 0)
        if port and await asyncio.to_thread(accepts, port):
            found.append(f"listener on {ip}:{port} ({name})")
    return found


async def _our_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since the kernel started that still work (idle pool workers,
    waiting for a job, are not the kernel's)."""
    frames = sys._current_frames()
    found = []
    for thread in threading.enumerate():
        if thread in before or not thread.is_alive() or thread.ident is None:
            continue
        frame = frames.get(thread.ident)
        if frame is not None and _idle_pool_worker(frame):
            continue
        found.append(f"thread {thread.name}")
    return found


def _idle_pool_worker(frame: Any) -> bool:
    """True when the thread waits for work in a concurrent.futures pool."""
    while frame is not None:
        if frame.f_code.co_name == "_worker" and frame.f_code.co_filename.endswith(
            os.path.join("concurrent", "futures", "thread.py")
        ):
            return True
        code = frame.f_code.co_filename
        if not (code.endswith("threading.py") or code.endswith("queue.py")):
            return False
        frame = frame.f_back
    return False

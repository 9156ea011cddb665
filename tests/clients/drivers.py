"""The clients of the matrix, each behind one interface: a :class:`Driver` starts one
kernel and runs the matrix's steps on it the way that client does.

- ``blocking``: ``KernelManager`` + ``BlockingKernelClient``, called from a thread of its
  own with no event loop running, as a script, ``jupyter console`` or qtconsole does;
- ``async``: ``AsyncKernelManager`` + ``AsyncKernelClient`` on the test's loop;
- ``multi``: ``AsyncMultiKernelManager``, the base of Jupyter Server's manager;
- ``server``: a real Jupyter Server process, over REST and the kernel's websocket;
- ``nbclient``: nbclient executing a notebook's cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbformat
import websockets
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager, KernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient

from tests.jupyter_server import JupyterServer, Output, execute_request, message, ws_request

#: Seconds any one request may take (a restart or a start on a busy machine included).
TIMEOUT = 60
#: Run with ``stop_on_error`` off: ipykernel would otherwise abort the next request if it
#: arrives right after the KeyboardInterrupt reply.
BUSY_LOOP = "while True: pass"


class Driver(ABC):
    """One client driving one kernel of kernelspec ``spec_name``."""

    def __init__(self, spec_name: str, ksm: KernelSpecManager) -> None:
        self.spec_name = spec_name
        self.ksm = ksm
        self.kernel_id = ""

    @abstractmethod
    async def start(self) -> None:
        """Start the kernel and connect to it; set :attr:`kernel_id`."""

    @abstractmethod
    async def execute(self, code: str) -> Output:
        """Run ``code``; its reply and output."""

    @abstractmethod
    async def request(self, msg_type: str, **content: Any) -> dict[str, Any]:
        """Send a shell request (complete, inspect); its reply content."""

    @abstractmethod
    async def interrupt_busy_loop(self) -> Output:
        """Run a busy loop, interrupt it as this client does, and return its output."""

    @abstractmethod
    async def restart(self) -> None:
        """Restart the kernel as this client does, and wait until it answers."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Shut the kernel down as this client does."""

    @abstractmethod
    async def close(self) -> None:
        """Best effort: stop whatever a failed test left running (idempotent)."""

    @abstractmethod
    def connection_info(self) -> dict[str, Any]:
        """The connection info the client uses (ip and the five ports)."""


class ClientDriver(Driver):
    """The in-process clients: a jupyter_client manager and its kernel client.

    ``call`` runs one call of theirs: awaited on the test's loop, or, for the blocking
    manager, in a thread of its own where no loop runs.
    """

    thread: ThreadPoolExecutor | None = None
    km: Any = None
    kc: Any = None

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.thread is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.thread, functools.partial(fn, *args, **kwargs))
        result = fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def connect(self) -> None:
        self.kc = self.km.client()
        await self.call(self.kc.start_channels)
        await self.call(self.kc.wait_for_ready, timeout=TIMEOUT)

    async def execute(self, code: str) -> Output:
        out = Output()
        reply = await self.call(
            self.kc.execute_interactive, code, output_hook=out.add, timeout=TIMEOUT
        )
        out.reply = reply["content"]
        return out

    async def request(self, msg_type: str, **content: Any) -> dict[str, Any]:
        send = {"complete_request": self.kc.complete, "inspect_request": self.kc.inspect}
        reply = await self.call(send[msg_type], **content, reply=True, timeout=TIMEOUT)
        return reply["content"]

    async def interrupt_busy_loop(self) -> Output:
        out = Output()
        msg_id = await self.call(self.kc.execute, BUSY_LOOP, stop_on_error=False)
        while True:  # until the kernel is busy with it
            msg = await self.call(self.kc.get_iopub_msg, timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "busy":
                break
        await asyncio.sleep(0.5)
        await self.interrupt()
        while out.reply is None:
            reply = await self.call(self.kc.get_shell_msg, timeout=TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                out.reply = reply["content"]
        return out

    async def interrupt(self) -> None:
        await self.call(self.km.interrupt_kernel)

    async def restart(self) -> None:
        await self.call(self.km.restart_kernel)
        await self.call(self.kc.wait_for_ready, timeout=TIMEOUT)

    async def shutdown(self) -> None:
        await self.call(self.kc.stop_channels)
        await self.call(self.km.shutdown_kernel)

    async def close(self) -> None:
        if self.kc is not None:
            with contextlib.suppress(Exception):
                await self.call(self.kc.stop_channels)
        if self.km is not None and self.km.has_kernel:
            with contextlib.suppress(Exception):
                await self.call(self.km.shutdown_kernel, now=True)
        if self.thread is not None:
            self.thread.shutdown(wait=False)

    def connection_info(self) -> dict[str, Any]:
        return dict(self.km.get_connection_info())


class BlockingDriver(ClientDriver):
    """``KernelManager`` + ``BlockingKernelClient``, from a thread with no loop."""

    async def start(self) -> None:
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="blocking-client")
        self.km = KernelManager(kernel_name=self.spec_name, kernel_spec_manager=self.ksm)
        await self.call(self.km.start_kernel)
        self.kernel_id = self.km.kernel_id
        await self.connect()


class AsyncDriver(ClientDriver):
    """``AsyncKernelManager`` + ``AsyncKernelClient`` on the test's loop."""

    async def start(self) -> None:
        self.km = AsyncKernelManager(kernel_name=self.spec_name, kernel_spec_manager=self.ksm)
        await self.km.start_kernel()
        self.kernel_id = self.km.kernel_id
        await self.connect()


class MultiDriver(ClientDriver):
    """``AsyncMultiKernelManager``: the kernel is addressed by id, as Jupyter Server does."""

    mkm: AsyncMultiKernelManager | None = None

    async def start(self) -> None:
        self.mkm = AsyncMultiKernelManager(kernel_spec_manager=self.ksm)
        self.kernel_id = await self.mkm.start_kernel(kernel_name=self.spec_name)
        self.km = self.mkm.get_kernel(self.kernel_id)
        await self.connect()

    async def interrupt(self) -> None:
        assert self.mkm is not None
        await self.mkm.interrupt_kernel(self.kernel_id)

    async def restart(self) -> None:
        assert self.mkm is not None
        await self.mkm.restart_kernel(self.kernel_id)
        await self.kc.wait_for_ready(timeout=TIMEOUT)

    async def shutdown(self) -> None:
        assert self.mkm is not None
        self.kc.stop_channels()
        await self.mkm.shutdown_kernel(self.kernel_id)

    async def close(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.mkm is not None:
            with contextlib.suppress(Exception):
                await self.mkm.shutdown_all(now=True)


class NbclientDriver(ClientDriver):
    """nbclient executing cells of a notebook; it finds the kernelspec by name (on
    ``JUPYTER_PATH``), interrupts a cell that runs past its timeout, and shuts the
    kernel down when its kernel context ends."""

    def __init__(self, spec_name: str, ksm: KernelSpecManager) -> None:
        super().__init__(spec_name, ksm)
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(
            self.nb,
            kernel_name=spec_name,
            allow_errors=True,
            interrupt_on_timeout=True,
            timeout_func=lambda cell: cell.metadata.get("timeout", TIMEOUT),
            startup_timeout=TIMEOUT,
        )
        self.stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        await self.stack.enter_async_context(self.client.async_setup_kernel())
        self.km, self.kc = self.client.km, self.client.kc
        self.kernel_id = self.km.kernel_id

    async def run_cell(self, code: str, **metadata: Any) -> Output:
        cell = nbformat.v4.new_code_cell(code, metadata=metadata)
        self.nb.cells.append(cell)
        await self.client.async_execute_cell(cell, len(self.nb.cells) - 1)
        out = Output()
        for item in cell.outputs:
            kind = item["output_type"]
            if kind == "error":
                out.errors.append(f"{item['ename']}: {item['evalue']}")
                out.reply = {"status": "error", "ename": item["ename"]}
            elif kind == "stream":
                out.add({"msg_type": "stream", "content": item})
            else:
                out.add({"msg_type": kind, "content": item})
        out.reply = out.reply or {"status": "ok"}
        return out

    async def execute(self, code: str) -> Output:
        return await self.run_cell(code)

    async def interrupt_busy_loop(self) -> Output:
        return await self.run_cell(BUSY_LOOP, timeout=3)

    async def shutdown(self) -> None:
        await self.stack.aclose()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stack.aclose()
        await super().close()


class ServerDriver(Driver):
    """A Jupyter Server process: REST for the kernel's life, its websocket for messages."""

    def __init__(self, spec_name: str, ksm: KernelSpecManager, server: JupyterServer) -> None:
        super().__init__(spec_name, ksm)
        self.server = server
        self.session = uuid.uuid4().hex
        self.ws: Any = None
        self._info: dict[str, Any] = {}

    async def rest(self, method: str, path: str, expect: int, body: Any = None) -> Any:
        status, reply = await asyncio.to_thread(self.server.request, method, path, body)
        assert status == expect, f"{method} {path}: {status} {reply!r}\n{self.server.log()}"
        return reply

    async def start(self) -> None:
        kernel = await self.rest("POST", "api/kernels", 201, {"name": self.spec_name})
        self.kernel_id = kernel["id"]
        # The server's connection file holds what its clients connect to.
        path = Path(jupyter_runtime_dir()) / f"kernel-{self.kernel_id}.json"
        self._info = json.loads(path.read_text())
        self.ws = await websockets.connect(
            self.server.ws_url(self.kernel_id, self.session),
            additional_headers=self.server.ws_headers(),
            max_size=None,
            open_timeout=TIMEOUT,
        )
        await self.wait_for_ready()

    async def wait_for_ready(self) -> None:
        msg = message(self.session, "kernel_info_request", {})
        try:
            await ws_request(self.ws, msg, TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserver log:\n{self.server.log()[-6000:]}") from None

    async def execute(self, code: str) -> Output:
        return await ws_request(self.ws, execute_request(self.session, code), TIMEOUT)

    async def request(self, msg_type: str, **content: Any) -> dict[str, Any]:
        out = await ws_request(self.ws, message(self.session, msg_type, content), TIMEOUT)
        assert out.reply is not None
        return out.reply

    async def interrupt_busy_loop(self) -> Output:
        async def interrupt() -> None:
            await asyncio.sleep(0.5)
            await self.rest("POST", f"api/kernels/{self.kernel_id}/interrupt", 204)

        msg = execute_request(self.session, BUSY_LOOP)
        msg["content"]["stop_on_error"] = False
        return await ws_request(self.ws, msg, TIMEOUT, on_sent=interrupt)

    async def restart(self) -> None:
        await self.rest("POST", f"api/kernels/{self.kernel_id}/restart", 200)
        await self.wait_for_ready()

    async def shutdown(self) -> None:
        await self.ws.close()
        await self.rest("DELETE", f"api/kernels/{self.kernel_id}", 204)
        await self.rest("GET", f"api/kernels/{self.kernel_id}", 404)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.kernel_id:
            await asyncio.to_thread(self.server.request, "DELETE", f"api/kernels/{self.kernel_id}")

    def connection_info(self) -> dict[str, Any]:
        return dict(self._info)


DRIVERS: dict[str, type[Driver]] = {
    "blocking": BlockingDriver,
    "async": AsyncDriver,
    "multi": MultiDriver,
    "server": ServerDriver,
    "nbclient": NbclientDriver,
}

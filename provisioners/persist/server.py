"""The ``provisioners.persist`` Jupyter Server extension: adopt at start, detach at stop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float

from .adopt import adopt_kernels, detach_kernels


class PersistExtension(ExtensionApp):
    """Adopts the kernels stopped or dead servers left before the server serves a request
    (and every ``adopt_interval`` seconds after); detaches persisted kernels as it stops."""

    name = "provisioners.persist"
    load_other_extensions = True

    adopt_interval = Float(
        15.0,
        config=True,
        help="""Seconds between two looks for kernels to adopt once the server runs: the
        kernels of a server that died, or that stopped while this one was starting (a
        rolling update). 0 looks only at start.""",
    )
    detach_timeout = Float(
        20.0,
        config=True,
        help="""Longest time the server's stop spends detaching its kernels, within the
        pod's termination grace (30 s by default in Kubernetes).""",
    )

    def initialize_settings(self) -> None:
        serverapp: Any = self.serverapp
        self._task: asyncio.Task[None] | None = None
        loop = serverapp.io_loop
        if loop.asyncio_loop.is_running():  # an embedding that already runs the loop
            loop.add_callback(self._adopt_once)
            return
        # Before the HTTP server listens: a session whose kernel is not adopted yet would
        # be deleted by the first /api/sessions request.
        loop.run_sync(self._adopt_once)

    async def _adopt_once(self) -> None:
        serverapp: Any = self.serverapp
        started = time.monotonic()
        try:
            adopted = await adopt_kernels(serverapp.kernel_manager)
        except Exception as exc:
            self.log.warning("Adopting kernels failed: %s", exc)
            return
        if adopted:
            self.log.info(
                "Adopted %d kernel(s) in %.2f s: %s",
                len(adopted),
                time.monotonic() - started,
                ", ".join(adopted),
            )

    async def _adopt_forever(self) -> None:
        while True:
            await asyncio.sleep(self.adopt_interval)
            await self._adopt_once()

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.adopt_interval > 0:
            self._task = asyncio.ensure_future(self._adopt_forever())

    async def stop_extension(self) -> None:
        if self._task is not None:
            self._task.cancel()
        serverapp: Any = self.serverapp
        try:
            detached = await detach_kernels(serverapp.kernel_manager, self.detach_timeout)
        except Exception as exc:
            self.log.warning("Detaching kernels failed: %s", exc)
            return
        if detached:
            self.log.info("Detached %d kernel(s): %s", len(detached), ", ".join(detached))

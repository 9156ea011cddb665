"""A restart that keeps the kernel's ports, seen by a client whose websocket stays open.

Jupyter Server answers ``POST /api/kernels/<id>/restart`` once the provisioner has
launched the new kernel; the websocket's ZMQ sockets reconnect by themselves. A request
sent the moment the restart returns, on a websocket kept open through it (a client that
does not reconnect after a restart, or any client through an automatic restart), must
still get its reply, its output and its idle status: what the kernel publishes before
the websocket's iopub subscription reaches it is lost. Before provisioners waited for
that (:mod:`provisioners.connection.readiness`), a local kernel lost the idle status of
about one restart in three.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from websockets.asyncio.client import connect

from tests.helpers import write_kernelspec
from tests.jupyter_server import JupyterServer, ws_execute
from tests.targets import TargetCase

ROUNDS = 5


async def test_request_sent_as_restart_returns_gets_its_output(
    target: TargetCase, tmp_path: Path
) -> None:
    spec_name = f"rerun-{target.name}"
    with JupyterServer(tmp_path) as server:
        write_kernelspec(
            server.kernels, spec_name, target.provisioner, target.config, argv=target.argv
        )
        status, kernel = await asyncio.to_thread(
            server.request, "POST", "api/kernels", {"name": spec_name}
        )
        assert status == 201, f"{kernel}\n{server.log()}"
        kernel_id, session = kernel["id"], uuid.uuid4().hex
        try:
            async with connect(
                server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
            ) as ws:
                out = await ws_execute(ws, session, "print('before')")
                assert out["stdout"] == "before\n", out
                for round_ in range(ROUNDS):
                    status, reply = await asyncio.to_thread(
                        server.request, "POST", f"api/kernels/{kernel_id}/restart"
                    )
                    assert status == 200, f"{reply}\n{server.log()}"
                    out = await ws_execute(ws, session, f"print('run {round_}')", timeout=30)
                    assert out["stdout"] == f"run {round_}\n", f"restart {round_}: {out}"
        finally:
            status, _ = await asyncio.to_thread(
                server.request, "DELETE", f"api/kernels/{kernel_id}"
            )
        assert status == 204

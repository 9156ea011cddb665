"""Restarts seen by a client whose websocket stays open through them.

Jupyter Server creates a websocket's ZMQ streams when the client connects and re-creates
them only when it reconnects; JupyterLab's and ``GatewayClient``'s websockets stay open,
so they keep talking to the address the kernel had when they connected. A restart, REST
or automatic, must therefore keep the kernel's address (:mod:`provisioners.newports`).

- REST: the server answers ``POST /api/kernels/<id>/restart`` once the provisioner has
  launched the new kernel. A request sent at that moment must still get its reply, its
  output and its idle status: what the kernel publishes before the websocket's iopub
  subscription reaches it is lost. Before provisioners waited for that
  (:mod:`provisioners.connection.readiness`), a local kernel lost the idle status of about
  one restart in three.
- Automatic: the kernel process exits; jupyter_client's restarter restarts it, asking
  for ``newports=True`` when it died in its first seconds. Nothing tells the client when
  the restart is done: it sees ``restarting``, then asks until the kernel answers. When
  the restart moved the kernel to new ports, the open websocket never got a reply again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.helpers import write_kernelspec
from tests.jupyter_server import (
    JupyterServer,
    Output,
    execute_request,
    message,
    ws_execute,
    ws_request,
)
from tests.targets import TargetCase, kubernetes_case

ROUNDS = 5
#: Per death: the server's restarter config, and what its log says of the restart. With
#: jupyter_client's defaults a kernel that dies in its first seconds (before 10 s alive)
#: is restarted on "new random ports"; a restarter polling every 0.5 s and taking a
#: kernel alive for 1 s as started restarts a later death on the same ports.
DEATHS: dict[str, tuple[dict[str, Any], str]] = {
    "early": ({}, "restarting kernel (1/5), new random ports"),
    "late": (
        {"KernelRestarter": {"time_to_dead": 0.5, "stable_start_time": 1.0}},
        "restarting kernel (1/5), keep random ports",
    ),
}
#: How long the "late" case lets the kernel live first: past its stable start above.
LATE_DEATH_AFTER = 3.0
DIE = "import os; os._exit(1)"


async def test_request_sent_as_restart_returns_gets_its_output(
    target: TargetCase, tmp_path: Path
) -> None:
    await _rest_restarts(target, tmp_path)


@pytest.mark.parametrize("death", list(DEATHS))
async def test_open_websocket_gets_replies_after_an_automatic_restart(
    target: TargetCase, tmp_path: Path, death: str
) -> None:
    await _automatic_restart(target, tmp_path, death)


@pytest.mark.parametrize("restart", ["rest", "automatic"])
async def test_pod_ip_mode_keeps_an_open_websocket_through_a_restart(
    kube: Any, tmp_path: Path, restart: str
) -> None:
    """Pod-IP mode (the chart's default, its server running in the cluster): a new pod
    gets a new IP, so only an address the server keeps for the kernel survives it."""
    case = kubernetes_case(kube)
    case = dataclasses.replace(case, config={**case.config, "connection_mode": "pod-ip"})
    if restart == "rest":
        await _rest_restarts(case, tmp_path, rounds=2)
    else:
        await _automatic_restart(case, tmp_path, "early")


async def _rest_restarts(target: TargetCase, tmp_path: Path, rounds: int = ROUNDS) -> None:
    with JupyterServer(tmp_path) as server:
        kernel_id = await _start(server, target)
        session = uuid.uuid4().hex
        try:
            async with connect(
                server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
            ) as ws:
                out = await ws_execute(ws, session, "print('before')")
                assert out["stdout"] == "before\n", out
                for round_ in range(rounds):
                    status, reply = await asyncio.to_thread(
                        server.request, "POST", f"api/kernels/{kernel_id}/restart"
                    )
                    assert status == 200, f"{reply}\n{server.log()}"
                    out = await ws_execute(ws, session, f"print('run {round_}')", timeout=30)
                    assert out["stdout"] == f"run {round_}\n", f"restart {round_}: {out}"
        finally:
            await _delete(server, kernel_id)


async def _automatic_restart(target: TargetCase, tmp_path: Path, death: str) -> None:
    config, logged = DEATHS[death]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(config))
    with JupyterServer(tmp_path, env={"JUPYTER_CONFIG_DIR": str(config_dir)}) as server:
        kernel_id = await _start(server, target)
        session = uuid.uuid4().hex
        try:
            async with connect(
                server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
            ) as ws:
                out = await ws_execute(ws, session, "print('before')")
                assert out["stdout"] == "before\n", out
                if death == "late":
                    await asyncio.sleep(LATE_DEATH_AFTER)
                await ws.send(json.dumps(execute_request(session, DIE)))
                await _wait_for_status(ws, "restarting", timeout=60)
                await _until_answering(ws, session, timeout=90)
                out = await ws_request(ws, execute_request(session, "print('after')"), 30)
                assert (out.stdout, out.status) == ("after\n", "ok"), out
            assert logged in server.log(), server.log()
        finally:
            await _delete(server, kernel_id, restart_may_be_pending=True)


async def _start(server: JupyterServer, target: TargetCase) -> str:
    spec_name = f"rerun-{target.name}"
    write_kernelspec(server.kernels, spec_name, target.provisioner, target.config, argv=target.argv)
    status, kernel = await asyncio.to_thread(
        server.request, "POST", "api/kernels", {"name": spec_name}
    )
    assert status == 201, f"{kernel}\n{server.log()}"
    return str(kernel["id"])


async def _delete(
    server: JupyterServer, kernel_id: str, restart_may_be_pending: bool = False
) -> None:
    """Shut the kernel down. After an automatic restart, the kernel answers through its
    kept address a moment before the restart returns (SSH: its launch still checks the
    new process); jupyter_client fails a shutdown meanwhile (``InvalidStateError``, HTTP
    500: an upstream race no client can see coming), so that one answer is retried."""
    deadline = time.monotonic() + 30
    while True:
        status, reply = await asyncio.to_thread(
            server.request, "DELETE", f"api/kernels/{kernel_id}"
        )
        pending = status == 500 and "InvalidStateError" in server.log()
        if not (restart_may_be_pending and pending and time.monotonic() < deadline):
            break
        await asyncio.sleep(0.5)
    assert status == 204, f"{reply}\n{server.log()}"


async def _wait_for_status(ws: Any, state: str, timeout: float) -> None:
    """Read the websocket until the kernel's status is ``state``."""
    seen: list[str] = []

    async def wait() -> None:
        while True:
            msg = json.loads(await ws.recv())
            current = msg.get("content", {}).get("execution_state", "")
            seen.append(f"{msg.get('channel')}:{msg.get('msg_type')}:{current}")
            if msg.get("msg_type") == "status" and current == state:
                return

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {state!r} status in {timeout:g} s; saw {seen[-20:]}") from None


async def _until_answering(ws: Any, session: str, timeout: float) -> Output:
    """Ask the kernel for its info on the open websocket until it answers with its reply
    and its idle status (requests sent while it was down may be answered later, or not)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return await ws_request(
                ws, message(session, "kernel_info_request", {}), timeout=min(5.0, max(left, 0))
            )
        except AssertionError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no kernel_info reply on the open websocket {timeout:g} s after "
                    f"the restart began: {exc}"
                ) from None

"""Kernels outlive the chart's server on a real cluster (issue 21); e2e/run.sh sets it up.

Three kernels run through the chart's server: one busy printing in a loop, one idle
holding a variable, one claimed from a warm pool. Then, one after the other: a `helm
upgrade` with a new server image tag and a changed value, a deleted server pod, and a
SIGKILL of the server process. After each, the new server lists the same three kernels,
the idle one still holds its variable and the busy one has gone on counting; a Jupyter
Server in gateway mode (a JupyterHub user's server) keeps its notebook's websocket open
through all three and it answers again with no action. Each disruption's stop time and
API downtime are printed (`-s`) and the downtime is held to 15 s.

Needs run.sh's environment (E2E_KUBECONFIG, E2E_KUBECTL, E2E_HELM, E2E_CHART, E2E_NAMESPACE,
E2E_RELEASE, E2E_TOKEN, E2E_SERVER_IMAGE, E2E_IMAGE_IMPORT): every test skips without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e.helpers import ENV, MISSING, Forward, helm_upgrade, kubectl, server_pod
from tests.jupyter_server import (
    JupyterServer,
    execute_request,
    until_answering,
    ws_execute,
    ws_request,
)

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(
        bool(MISSING), reason=f"run through e2e/run.sh (E2E_{', E2E_'.join(MISSING)} unset)"
    ),
]
DOWNTIME_GOAL = 15.0
#: What the disruption's own duration measures.
DONE = {
    "helm upgrade": "`helm upgrade --wait` returned (the new server Ready)",
    "server pod deleted": "the old pod was gone (its server's stop and the pod's end)",
    "server SIGKILLed": "the kill",
}
COUNTER = (
    "import threading, time\n"
    "ticks = 0\n"
    "def _tick():\n"
    "    global ticks\n"
    "    while True:\n"
    "        ticks += 1\n"
    "        print('tick', ticks, flush=True)\n"
    "        time.sleep(0.5)\n"
    "threading.Thread(target=_tick, daemon=True).start()\n"
)


def _sigkill_server() -> None:
    """SIGKILL the server process of the server pod (its container restarts in place)."""
    name = server_pod()["metadata"]["name"]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (proc / "environ").read_bytes().split(b"\0")
            if (
                f"POD_NAME={name}".encode() in environ
                and b"jupyter" in (proc / "cmdline").read_bytes()
            ):
                os.kill(int(proc.name), signal.SIGKILL)
                return
    raise AssertionError(f"no server process of pod {name} on this machine")


def _disrupt(what: str) -> tuple[float, float]:
    """Disrupt the server; returns (seconds its stop took, seconds of preparation that
    precede the disruption itself: a new image tag imported before the upgrade)."""
    prepared = 0.0
    if what == "helm upgrade":
        t0 = time.monotonic()
        tag = f"{ENV['SERVER_IMAGE'].rsplit(':', 1)[0]}:e2e-upgrade"
        subprocess.run(["docker", "tag", ENV["SERVER_IMAGE"], tag], check=True)
        if ENV["IMAGE_IMPORT"] not in ("", "none"):
            importer = [*shlex.split(ENV["IMAGE_IMPORT"]), tag]
            subprocess.run(importer, check=True, capture_output=True)
        prepared = time.monotonic() - t0
        t1 = time.monotonic()
        helm_upgrade("image.tag=e2e-upgrade", "server.logLevel=DEBUG")
        return time.monotonic() - t1, prepared
    t1 = time.monotonic()
    if what == "server pod deleted":
        kubectl("delete", "pod", server_pod()["metadata"]["name"], "--wait=true")
        return time.monotonic() - t1, prepared
    restarts = _restart_count()
    _sigkill_server()
    deadline = time.monotonic() + 120
    while _restart_count() == restarts:  # the kubelet saw the server die
        assert time.monotonic() < deadline, "the SIGKILLed server's container did not restart"
        time.sleep(0.5)
    return 0.0, prepared


def _restart_count() -> int:
    return int(server_pod()["status"]["containerStatuses"][0].get("restartCount", 0))


async def _ws(url: str, token: str, kernel_id: str, session: str) -> Any:
    from websockets.asyncio.client import connect

    ws_url = (
        url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={session}"
    )
    return await connect(
        ws_url, additional_headers={"Authorization": f"token {token}"}, max_size=None
    )


async def test_kernels_survive_upgrade_pod_deletion_and_sigkill(
    forward: Forward, tmp_path: Path
) -> None:
    await asyncio.to_thread(
        helm_upgrade, "kernels.pools.sizes.python3=1"
    )  # a pool to claim the third kernel from
    await asyncio.to_thread(forward.wait_for_kernels, set())
    await asyncio.to_thread(forward.wait_for_warm_kernel, "python3")
    ids: dict[str, str] = {}
    for role in ("pooled", "busy"):  # the first start claims the pool's warm kernel
        status, model = await asyncio.to_thread(
            forward.request, "POST", "/api/kernels", {"name": "python3"}
        )
        assert status == 201, model
        ids[role] = model["id"]
    user = JupyterServer(
        tmp_path / "user",
        args=[f"--gateway-url={forward.url}", f"--GatewayClient.auth_token={ENV['TOKEN']}"],
    )
    session = uuid.uuid4().hex
    with user:
        # the idle kernel is the notebook's, started through the user's gateway-mode server
        status, model = await asyncio.to_thread(
            user.request,
            "POST",
            "api/sessions",
            {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
        )
        assert status == 201, model
        ids["idle"] = model["kernel"]["id"]
        pods = json.loads(
            await asyncio.to_thread(
                kubectl,
                "get",
                "pods",
                "-A",
                "-l",
                "app.kubernetes.io/component=kernel",
                "-o",
                "json",
            )
        )["items"]
        names = {
            p["metadata"]["labels"].get("cluster-provisioners/kernel-id"): p["metadata"]["name"]
            for p in pods
        }
        assert "pool" in names.get(ids["pooled"], ""), names
        for role, kernel_id in ids.items():
            ws = await _ws(forward.url, ENV["TOKEN"], kernel_id, session)
            async with ws:
                code = COUNTER if role == "busy" else f"value = '{role}-' + {kernel_id!r}"
                assert (await ws_execute(ws, session, code))["status"] == "ok"
        notebook = await _ws(user.base.rstrip("/"), user.token, ids["idle"], session)
        async with notebook:
            report = []
            last_ticks = 0
            for what in ("helm upgrade", "server pod deleted", "server SIGKILLed"):
                t0 = time.monotonic()
                stopped, prepared = await asyncio.to_thread(_disrupt, what)
                await asyncio.to_thread(forward.wait_for_kernels, set(ids.values()))
                downtime = forward.longest_gap(t0 + prepared, time.monotonic())
                report.append(
                    f"{what}: {stopped:.1f} s until {DONE[what]}; the API did not answer "
                    f"for {downtime:.1f} s at most"
                )
                print(report[-1])
                for role, kernel_id in ids.items():
                    ws = await _ws(forward.url, ENV["TOKEN"], kernel_id, session)
                    async with ws:
                        await until_answering(ws, session, timeout=60)
                        if role == "busy":
                            # the counter's thread prints into this cell's output too
                            out = await ws_execute(ws, session, "print(f'ticks={ticks}')")
                            found = re.search(r"ticks=(\d+)", out["stdout"])
                            assert found is not None, (what, out)
                            ticks = int(found.group(1))
                            assert ticks > last_ticks, (what, ticks, last_ticks)
                            last_ticks = ticks
                        else:
                            out = await ws_execute(ws, session, "print(value)")
                            assert out["stdout"] == f"{role}-{kernel_id}\n", (what, out)
                # the gateway-mode notebook answers on the websocket it kept open
                await until_answering(notebook, session, timeout=60)
                out = await ws_request(notebook, execute_request(session, "print(value)"))
                assert out.stdout == f"idle-{ids['idle']}\n", (what, out)
                if what != "server SIGKILLed":  # a SIGKILL's downtime includes kubelet's backoff
                    assert downtime <= DOWNTIME_GOAL, report
        print("\n".join(report))
        for kernel_id in ids.values():
            forward.request("DELETE", f"/api/kernels/{kernel_id}")

"""A kernel's client-side address survives every restart, in both connection modes.

A restart makes a new pod, which gets a new IP. Jupyter Server re-creates a websocket's
ZMQ streams only when a client reconnects, so a websocket that stays open (JupyterLab's,
a gateway's) keeps using the address it was given: in pod-IP mode the server therefore
reaches the kernel through local relays that follow it to its next pod
(``pod_ip_relay``), and the port-forward keeps its local listeners. Checked through a
real Jupyter Server, across a REST restart and an automatic one (the kernel process
exits), each followed by a request on the same websocket; and with a synchronous
KernelManager and a blocking client that keeps its channels open.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from provisioners.connection.ports import ClusterPortCache
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient
from tests.helpers import (
    KUBERNETES_PROVISIONER,
    Kube,
    restart_with_a_blocking_client,
    write_kernelspec,
)
from tests.jupyter_server import (
    JupyterServer,
    delete_kernel,
    execute_request,
    wait_for_status,
    ws_execute,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

MODES = [
    pytest.param({"connection_mode": "pod-ip"}, id="pod-ip"),
    pytest.param({"connection_mode": "port-forward"}, id="port-forward"),
]


async def kernel_pod(api: KubeClient, kube: Kube, kernel_id: str) -> dict[str, Any]:
    """The newest pod of ``kernel_id`` that is not being deleted."""
    label = f"{m.LABEL_KERNEL_ID}={m.sanitize_label_value(kernel_id)}"
    path = f"/api/v1/namespaces/{kube.namespace}/pods"
    items = (await api.request("GET", path, query=[("labelSelector", label)]))["items"]
    live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    assert live, f"no live pod of kernel {kernel_id}: {[p['metadata']['name'] for p in items]}"
    return max(live, key=lambda p: str(p["metadata"].get("creationTimestamp", "")))


async def pods_gone(api: KubeClient, kube: Kube, kernel_id: str, wait: float) -> list[str]:
    """Pods of ``kernel_id`` still there after waiting up to ``wait`` s."""
    label = f"{m.LABEL_KERNEL_ID}={m.sanitize_label_value(kernel_id)}"
    path = f"/api/v1/namespaces/{kube.namespace}/pods"
    deadline = time.monotonic() + wait
    while True:
        items = (await api.request("GET", path, query=[("labelSelector", label)]))["items"]
        if not items or time.monotonic() > deadline:
            return [p["metadata"]["name"] for p in items]
        await asyncio.sleep(0.5)


def tail(server: JupyterServer, lines: int = 60) -> str:
    return "\n".join(server.log().splitlines()[-lines:])


@pytest.mark.parametrize("config", MODES)
async def test_an_open_websocket_keeps_its_kernel_across_restarts(
    kube: Kube, kube_api: KubeClient, tmp_path: Path, config: dict[str, Any]
) -> None:
    spec_name = f"k8s-{config['connection_mode']}"
    pods: list[dict[str, Any]] = []
    with JupyterServer(tmp_path) as server:
        settings = kube.config(**config)
        write_kernelspec(server.kernels, spec_name, KUBERNETES_PROVISIONER, settings, **kube.spec())
        status, kernel = await asyncio.to_thread(
            server.request, "POST", "api/kernels", {"name": spec_name}
        )
        assert status == 201, f"{kernel}\n{tail(server)}"
        kernel_id, session = kernel["id"], uuid.uuid4().hex
        try:
            async with connect(
                server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
            ) as ws:

                async def run(code: str, expected: str, when: str) -> None:
                    try:
                        out = await ws_execute(ws, session, code, timeout=60)
                    except AssertionError as exc:
                        raise AssertionError(f"{when}: {exc}\n{tail(server)}") from None
                    assert out["stdout"] == expected, f"{when}: {out}\n{tail(server)}"

                await run("print('before')", "before\n", "before any restart")
                pods.append(await kernel_pod(kube_api, kube, kernel_id))

                status, reply = await asyncio.to_thread(
                    server.request, "POST", f"api/kernels/{kernel_id}/restart"
                )
                assert status == 200, f"{reply}\n{tail(server)}"
                await run("print('rest')", "rest\n", "after a REST restart")
                pods.append(await kernel_pod(kube_api, kube, kernel_id))

                # the kernel process exits: the restarter starts it again, in a new pod
                await ws.send(json.dumps(execute_request(session, "import os; os._exit(1)")))
                await wait_for_status(ws, "restarting", timeout=60)
                await run("print('auto')", "auto\n", "after an automatic restart")
                pods.append(await kernel_pod(kube_api, kube, kernel_id))
        finally:
            status, reply = await delete_kernel(server, kernel_id, restart_may_be_pending=True)
        assert status == 204, f"{reply}\n{tail(server)}"
        restarts = re.findall(r"restarting kernel \(1/\d+\), (new|keep) random ports", server.log())
        assert restarts, tail(server)
    names = [p["metadata"]["name"] for p in pods]
    assert len(set(names)) == 3, f"each restart makes a new pod: {names}"
    if config["connection_mode"] == "pod-ip":
        ips = [p["status"].get("podIP") for p in pods]
        assert len(set(ips)) == 3, f"each new pod has a new IP, or this test shows nothing: {ips}"
    assert await pods_gone(kube_api, kube, kernel_id, wait=60) == []


def test_a_blocking_client_keeps_the_relay_address_across_a_restart(
    kube: Kube, tmp_path: Path
) -> None:
    """A synchronous KernelManager (its loop runs only during calls) and a blocking client
    that keeps its channels: the relays run on the engine loop, and follow the restart."""
    config = kube.config(connection_mode="pod-ip")
    ksm = write_kernelspec(
        tmp_path / "kernels", "k8s-relay", KUBERNETES_PROVISIONER, config, **kube.spec()
    )
    km = restart_with_a_blocking_client(
        ksm, "k8s-relay", kernel_address=lambda km: km.provisioner.engine.pod_ip
    )
    held = ClusterPortCache.instance().held()
    assert [
        port
        for ports in held.values()
        for port, record in ports.items()
        if str(km.kernel_id) in str(record.get("owner", ""))
    ] == []

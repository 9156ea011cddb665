"""Restarts seen by a client whose websocket stays open through them.

Jupyter Server creates a websocket's ZMQ streams when the client connects and re-creates
them only when it reconnects; JupyterLab's and ``GatewayClient``'s websockets stay open,
so they keep talking to the address the kernel had when they connected. A restart, REST
or automatic, must therefore keep the kernel's address (:mod:`provisioners.lifecycle.newports`).

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

Pod-IP mode (Kubernetes) and container-IP mode (Docker) reach a kernel at its own IP,
which a restart changes (a new pod, a new container): the server keeps the address
through local relays that follow the kernel. A synchronous ``KernelManager`` with a
blocking client checks that those relays run between the manager's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    restart_with_a_blocking_client,
    write_kernelspec,
)
from tests.jupyter_server import (
    JupyterServer,
    delete_kernel,
    execute_request,
    until_answering,
    wait_for_status,
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


class MovingIPs:
    """A network of the test's own where each restart gives the kernel a new IP.

    Docker gives a container the lowest free address of its network, so a restarted
    kernel gets its old IP back on a quiet network (a busy one hands it to whoever comes
    first). Placeholder containers hold the lowest addresses before the kernel starts;
    :meth:`move` removes the newest one, so the restart's new container gets its
    address, and records the kernel's IP before it does.
    """

    def __init__(self, client: Any, count: int) -> None:
        self.client = client
        self.network = client.networks.create(f"cp-test-moving-{uuid.uuid4().hex[:8]}")
        self.placeholders: list[Any] = []
        self.ips: list[str] = []
        try:
            for index in range(count):
                self.placeholders.append(
                    client.containers.run(
                        KERNEL_TEST_IMAGE,
                        ["sleep", "600"],
                        name=f"{self.network.name}-{index}",
                        detach=True,
                        network=self.network.name,
                    )
                )
        except BaseException:
            self.close()
            raise

    def kernel_ip(self, kernel_id: str) -> str:
        label = f"cluster-provisioners.kernel-id={kernel_id}"
        found = self.client.containers.list(filters={"label": label})
        assert len(found) == 1, found
        return str(found[0].attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"])

    def move_now(self, kernel_id: str) -> None:
        """Record the kernel's IP; free a lower address for its next container (before a
        restart; after the last one, only the record counts)."""
        self.ips.append(self.kernel_ip(kernel_id))
        if self.placeholders:
            self.placeholders.pop().remove(force=True)

    async def move(self, kernel_id: str) -> None:
        """:meth:`move_now`, in a thread."""
        await asyncio.to_thread(self.move_now, kernel_id)

    def close(self) -> None:
        for container in self.placeholders:
            container.remove(force=True)
        self.network.remove()


@pytest.fixture
def moving_ips(docker_client: Any) -> Iterator[MovingIPs]:
    ips = MovingIPs(docker_client, 2)
    yield ips
    ips.close()


def _container_ip_case(network: str) -> TargetCase:
    config = {
        "image": KERNEL_TEST_IMAGE,
        "connect_via_container_ip": True,
        "network": network,
    }
    return TargetCase("docker-ip", "cluster-docker-provisioner", CONTAINER_ARGV, config)


@pytest.mark.parametrize("restart", ["rest", "automatic"])
async def test_container_ip_mode_keeps_an_open_websocket_through_a_restart(
    moving_ips: MovingIPs, tmp_path: Path, restart: str
) -> None:
    """Docker's container-IP mode: a restart makes a new container, with a new IP."""
    case = _container_ip_case(moving_ips.network.name)
    if restart == "rest":
        await _rest_restarts(case, tmp_path, rounds=2, each_round=moving_ips.move)
    else:
        await _automatic_restart(case, tmp_path, "early", each_round=moving_ips.move)
    assert len(set(moving_ips.ips)) == len(moving_ips.ips) > 1, moving_ips.ips


def test_container_ip_mode_keeps_a_blocking_client_through_a_restart(
    moving_ips: MovingIPs, tmp_path: Path
) -> None:
    """A synchronous KernelManager runs its loop only during its calls, and a blocking
    client keeps its channels: the relays must follow the new container meanwhile."""
    case = _container_ip_case(moving_ips.network.name)
    ksm = write_kernelspec(
        tmp_path / "kernels", "docker-ip", case.provisioner, case.config, argv=case.argv
    )
    restart_with_a_blocking_client(
        ksm,
        "docker-ip",
        kernel_address=lambda km: km.provisioner.engine.container_ip,
        # no asyncio.run: it unsets the manager's loop
        before_restart=lambda km: moving_ips.move_now(str(km.kernel_id)),
    )


@contextlib.asynccontextmanager
async def _open_websocket(
    target: TargetCase,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    restart_may_be_pending: bool = False,
) -> AsyncIterator[tuple[JupyterServer, str, str, Any]]:
    """A Jupyter Server with a kernel of ``target``, and a websocket to it on which the
    kernel has answered once: ``(server, kernel_id, session, ws)``. The kernel is shut
    down on exit (``restart_may_be_pending``: after an automatic restart)."""
    with JupyterServer(tmp_path, env=env) as server:
        kernel_id = await _start(server, target)
        session = uuid.uuid4().hex
        try:
            async with connect(
                server.ws_url(kernel_id, session), additional_headers=server.ws_headers()
            ) as ws:
                out = await ws_execute(ws, session, "print('before')")
                assert out["stdout"] == "before\n", out
                yield server, kernel_id, session, ws
        finally:
            status, reply = await delete_kernel(
                server, kernel_id, restart_may_be_pending=restart_may_be_pending
            )
            assert status == 204, f"{reply}\n{server.log()}"


async def _rest_restarts(
    target: TargetCase,
    tmp_path: Path,
    rounds: int = ROUNDS,
    each_round: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    async with _open_websocket(target, tmp_path) as (server, kernel_id, session, ws):
        for round_ in range(rounds):
            if each_round is not None:
                await each_round(kernel_id)
            status, reply = await asyncio.to_thread(
                server.request, "POST", f"api/kernels/{kernel_id}/restart"
            )
            assert status == 200, f"{reply}\n{server.log()}"
            out = await ws_execute(ws, session, f"print('run {round_}')", timeout=30)
            assert out["stdout"] == f"run {round_}\n", f"restart {round_}: {out}"
        if each_round is not None:
            await each_round(kernel_id)


async def _automatic_restart(
    target: TargetCase,
    tmp_path: Path,
    death: str,
    each_round: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    config, logged = DEATHS[death]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(config))
    env = {"JUPYTER_CONFIG_DIR": str(config_dir)}
    opened = _open_websocket(target, tmp_path, env, restart_may_be_pending=True)
    async with opened as (server, kernel_id, session, ws):
        if death == "late":
            await asyncio.sleep(LATE_DEATH_AFTER)
        if each_round is not None:
            await each_round(kernel_id)
        await ws.send(json.dumps(execute_request(session, DIE)))
        await wait_for_status(ws, "restarting", timeout=60)
        await until_answering(ws, session, timeout=90)
        out = await ws_request(ws, execute_request(session, "print('after')"), 30)
        assert (out.stdout, out.status) == ("after\n", "ok"), out
        if each_round is not None:
            await each_round(kernel_id)
        assert logged in server.log(), server.log()


async def _start(server: JupyterServer, target: TargetCase) -> str:
    spec_name = f"rerun-{target.name}"
    write_kernelspec(server.kernels, spec_name, target.provisioner, target.config, argv=target.argv)
    status, kernel = await asyncio.to_thread(
        server.request, "POST", "api/kernels", {"name": spec_name}
    )
    assert status == 201, f"{kernel}\n{server.log()}"
    return str(kernel["id"])

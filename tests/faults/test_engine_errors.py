"""The engine hooks' error contract under injected faults: the engine fails in the middle
of an operation (Docker daemon gone, Kubernetes API refusing, SSH connection dropped).

Interrupt, terminate and kill are best-effort and never abort a shutdown; what cleanup
could not remove stays recorded, with its ports, and is retried; once the engine is back
nothing is left: no container, pod or remote process, no port record, no open session.
The Docker daemon and sshd are reached through a relay that the test cuts and restores
(tests/faults/proxy.py), never restarted: other users of the engine are not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import KernelStartError
from provisioners.lifecycle import leftovers
from tests.faults.proxy import SocketProxy
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, LEFTOVER_WAIT, count, execute
from tests.targets import resolve

RETRY = 0.5  # cleanup_retry_interval of the kernels here, in seconds


def docker_socket() -> str:
    """The local daemon's socket path (DOCKER_HOST when it names a unix socket)."""
    url = urlparse(os.environ.get("DOCKER_HOST", "") or "unix:///var/run/docker.sock")
    return url.path if url.scheme == "unix" else "/var/run/docker.sock"


@pytest.fixture
def docker_proxy(docker_client: Any) -> Iterator[SocketProxy]:
    """A relay of the Docker API socket on a short path of our own."""
    folder = tempfile.mkdtemp(prefix="cpf-", dir="/tmp")
    proxy = SocketProxy(os.path.join(folder, "docker.sock"), docker_socket()).start()
    yield proxy
    proxy.cut()
    shutil.rmtree(folder, ignore_errors=True)


async def eventually(
    check: Callable[[], Awaitable[list[str]]], timeout: float = LEFTOVER_WAIT
) -> list[str]:
    """``check()`` until it returns nothing or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        left = await check()
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.25)


def held_ports() -> list[str]:
    held = ClusterPortCache.instance().held()
    return [f"port {p} ({r['owner']})" for ports in held.values() for p, r in ports.items()]


def pending_removals() -> list[str]:
    return [f"pending removal of kernel {p.kernel_id}" for p in leftovers.pending()]


def docker_config(proxy: SocketProxy, **extra: Any) -> dict[str, Any]:
    return {
        "image": KERNEL_TEST_IMAGE,
        "docker_host": f"unix://{proxy.listen}",
        "fallback": "none",
        "cleanup_retry_interval": RETRY,
        **extra,
    }


@pytest.mark.docker
async def test_docker_daemon_gone_during_shutdown(
    kernel_manager: Any, docker_client: Any, docker_proxy: SocketProxy
) -> None:
    """Interrupt and shutdown succeed with the daemon gone; the container and its five
    port records stay recorded and are removed once the daemon answers again."""
    km = kernel_manager(
        "cluster-docker-provisioner",
        docker_config(docker_proxy),
        argv=CONTAINER_ARGV,
        interrupt_mode="signal",
    )
    await km.start_kernel()
    kernel_id = km.kernel_id
    assert (await execute(km, "print('up')"))["stdout"] == "up\n"

    docker_proxy.cut()
    count("faults injected", "docker")
    await km.interrupt_kernel()  # logged, not raised
    await km.shutdown_kernel()  # interrupt, terminate, kill: logged; cleanup still runs
    assert pending_removals(), "the container's removal failed but nothing was recorded"
    assert len(held_ports()) == 5, "the ports of a container not yet removed were released"

    docker_proxy.restore()

    remaining = await eventually(lambda: docker_left(docker_client, kernel_id))
    count("orphans after recovery", "docker", len(remaining))
    assert remaining == []
    assert km.provisioner.engine.client is None, "the Docker API session is still open"


@pytest.mark.docker
async def test_docker_daemon_restarted_under_a_kernel(
    kernel_manager: Any, docker_client: Any, docker_proxy: SocketProxy
) -> None:
    """The daemon goes away and its containers stop with it: a restart then fails with a
    named error; once the daemon is back a restart works and a delete leaves nothing."""
    km = kernel_manager(
        "cluster-docker-provisioner", docker_config(docker_proxy), argv=CONTAINER_ARGV
    )
    await km.start_kernel()
    kernel_id = km.kernel_id
    first = km.provisioner.engine.kernel_state()["container_id"]
    assert (await execute(km, "x = 41"))["status"] == "ok"

    docker_proxy.cut()  # as dockerd restarting: its socket is gone, its containers stop
    docker_client.api.kill(first)
    count("faults injected", "docker")
    with pytest.raises(KernelStartError, match="could not be removed"):
        await km.restart_kernel(now=True)

    docker_proxy.restore()
    await km.restart_kernel(now=True)
    second = km.provisioner.engine.kernel_state()["container_id"]
    assert second and second != first
    assert (await execute(km, "print('restarted')"))["stdout"] == "restarted\n"
    await km.shutdown_kernel()

    remaining = await docker_left(docker_client, kernel_id)
    count("orphans after recovery", "docker", len(remaining))
    assert remaining == []
    assert km.provisioner.engine.client is None, "the Docker API session is still open"


def kube_open_sessions() -> list[str]:
    from provisioners.k8s import client

    shared = client._SHARED.get(asyncio.get_running_loop(), {})
    return [f"Kubernetes API client of {key[0] or 'in-cluster'}" for key in shared]


@pytest.mark.k8s
@pytest.mark.parametrize(
    ("code", "times"),
    [(403, 2), (503, 8)],  # a DELETE is retried 3 times on a 5xx: 4 refusals per delete
    ids=["forbidden", "unavailable"],
)
async def test_kubernetes_api_refuses_the_delete(
    kernel_manager: Any, kube: Any, code: int, times: int
) -> None:
    """The API refuses the kill's and the cleanup's delete (403, or 503 past the client's
    retries): the shutdown completes, the pod stays recorded with its ports and is deleted
    by the retry once the API serves again; the pod is never force-deleted."""
    if kube.forbid is None:
        pytest.skip("needs the Kubernetes API double, which injects the refusal")
    double = kube.forbid.__self__
    km = kernel_manager(
        "cluster-kubernetes-provisioner",
        kube.config(cleanup_retry_interval=RETRY),
        **kube.spec(),
    )
    await km.start_kernel()
    kernel_id = km.kernel_id
    assert (await execute(km, "print('up')"))["stdout"] == "up\n"
    pod = km.provisioner.engine.kernel_state()["pod"]
    graces = asyncio.create_task(deletion_graces(kube, pod))
    await asyncio.sleep(0.5)  # the watch is established

    refusal = double.refuse("delete", "pods", times=times, code=code)
    count("faults injected", "kubernetes")
    try:
        await km.shutdown_kernel(now=True)  # the kill's delete and the cleanup's are refused
        assert pending_removals(), "the pod's deletion failed but nothing was recorded"
        assert held_ports(), "the ports of a pod not yet deleted were released"
    finally:
        refusal.lift()

    async def left() -> list[str]:
        found = await resolve(kubernetes_leftovers(kube, kernel_id))
        return found + held_ports() + pending_removals() + kube_open_sessions()

    remaining = await eventually(left)
    count("orphans after recovery", "kubernetes", len(remaining))
    assert remaining == []
    seen = await asyncio.wait_for(graces, 30)
    # the first is ours; the API itself sets 0 once the pod has finished (as a real one)
    assert seen and seen[0] >= 1, f"the pod was deleted with grace periods {seen}"


@pytest.mark.k8s
async def test_kubernetes_pods_are_never_force_deleted(kernel_manager: Any, kube: Any) -> None:
    """A kill deletes the pod with a grace period of at least 1 s, as kubectl does: a
    forced delete (0) drops the object while the kubelet may still run the kernel."""
    km = kernel_manager("cluster-kubernetes-provisioner", kube.config(), **kube.spec())
    await km.start_kernel()
    pod = km.provisioner.engine.kernel_state()["pod"]
    graces = asyncio.create_task(deletion_graces(kube, pod))
    await asyncio.sleep(0.5)  # the watch is established
    await km.shutdown_kernel(now=True)
    seen = await asyncio.wait_for(graces, 30)
    # the first is ours; the API itself sets 0 once the pod has finished (as a real one)
    assert seen and seen[0] >= 1, f"the pod was deleted with grace periods {seen}"


async def deletion_graces(kube: Any, pod: str) -> list[int]:
    """The deletionGracePeriodSeconds the pod shows until it is deleted."""
    from provisioners.k8s.client import KubeClient

    client = await KubeClient.connect(kube.kubeconfig)
    path = f"/api/v1/namespaces/{kube.namespace}/pods"
    seen: list[int] = []
    try:
        query = [("fieldSelector", f"metadata.name={pod}")]
        async for event in client.watch(path, query, timeout_seconds=120):
            grace = event["object"]["metadata"].get("deletionGracePeriodSeconds")
            if grace is not None:
                seen.append(int(grace))
            if event["type"] == "DELETED":
                return seen
    finally:
        await client.close()
    return seen


def kubernetes_leftovers(kube: Any, kernel_id: str) -> Any:
    from tests.targets import kubernetes_case

    return kubernetes_case(kube).leftovers(kernel_id)


@pytest.fixture
def ssh_proxy(ssh_engine: Any, tmp_path: Path) -> Iterator[tuple[SocketProxy, Path]]:
    """A TCP relay in front of the test sshd, and a known_hosts naming it."""
    sshd, _ = ssh_engine
    proxy = SocketProxy(("127.0.0.1", 0), (sshd.host, sshd.port)).start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{proxy.port} {sshd.host_key_public}\n")
    yield proxy, known_hosts
    proxy.cut()


@pytest.mark.ssh
async def test_ssh_connection_dropped_during_shutdown(
    kernel_manager: Any, ssh_engine: Any, ssh_proxy: tuple[SocketProxy, Path]
) -> None:
    """The SSH connection drops in the middle of a shutdown (after the interrupt) and the
    host stays unreachable: the shutdown completes; the remote kernel and its directory
    are removed once the host answers again, and no SSH session stays open."""
    from provisioners.connection.sshlink import SSHLink
    from tests.targets import ssh_case

    proxy, known_hosts = ssh_proxy
    case = ssh_case(*ssh_engine)
    spec = case.spec(
        port=proxy.port,
        ssh_known_hosts=str(known_hosts),
        fallback="none",
        cleanup_retry_interval=RETRY,
    )
    km = kernel_manager(case.provisioner, **spec)
    await km.start_kernel()
    kernel_id = km.kernel_id
    assert (await execute(km, "print('up')"))["stdout"] == "up\n"

    provisioner = km.provisioner
    requested = provisioner.shutdown_requested

    async def drop_then_request(restart: bool = False) -> None:
        proxy.cut()  # the interrupt went through; the rest of the shutdown finds no host
        count("faults injected", "ssh")
        await requested(restart)

    provisioner.shutdown_requested = drop_then_request
    await km.shutdown_kernel()
    assert proxy.cuts == 1, "the shutdown never asked the kernel to stop"
    assert case.leftovers(kernel_id), "the kernel ended although the host was unreachable"
    assert pending_removals(), "the remote cleanup failed but nothing was recorded"

    proxy.restore()

    async def left() -> list[str]:
        sessions = [f"SSH link to {link.settings.address}" for link in SSHLink.active()]
        return case.leftovers(kernel_id) + held_ports() + pending_removals() + sessions

    remaining = await eventually(left)
    count("orphans after recovery", "ssh", len(remaining))
    assert remaining == []


@pytest.mark.docker
async def test_a_restart_while_the_daemon_is_down_recovers_by_itself(
    tmp_path: Path, docker_client: Any, docker_proxy: SocketProxy
) -> None:
    """A restart asked while the daemon is gone fails saying why; the kernel keeps its
    address, and its restarter starts it again once the daemon answers (JupyterLab's
    notebook stayed 'Restarting' until a second restart)."""
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config

    from tests.helpers import write_kernelspec

    ksm = write_kernelspec(
        tmp_path / "kernels",
        "down",
        "cluster-docker-provisioner",
        docker_config(docker_proxy),
        argv=CONTAINER_ARGV,
    )
    config = Config({"KernelRestarter": {"time_to_dead": 0.5}})
    km = AsyncIOLoopKernelManager(kernel_name="down", kernel_spec_manager=ksm, config=config)
    await km.start_kernel()
    try:
        address = {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")}
        first = km.provisioner.engine.kernel_state()["container_id"]
        assert (await execute(km, "x = 41"))["status"] == "ok"

        docker_proxy.cut()  # as dockerd restarting: its socket is gone, its containers stop
        docker_client.api.kill(first)
        count("faults injected", "docker")
        with pytest.raises(Exception, match="restarter starts it again") as failed:
            await km.restart_kernel(now=True)
        assert "unreachable" in str(failed.value) or "could not be removed" in str(failed.value)

        docker_proxy.restore()  # no second restart: the restarter recovers the kernel

        async def answers() -> bool:
            try:
                return (await execute(km, "print('back')", timeout=5))["stdout"] == "back\n"
            except Exception:
                return False

        deadline = time.monotonic() + LEFTOVER_WAIT
        while not await answers():
            assert time.monotonic() < deadline, "the restarter did not start the kernel again"
            await asyncio.sleep(1)
        assert km.provisioner.engine.kernel_state()["container_id"] != first
        kept = {k: v for k, v in km.get_connection_info().items() if k.endswith("_port")}
        assert kept == address, "the kernel moved: open websockets would lose it"
    finally:
        km.stop_restarter()
        await km.shutdown_kernel(now=True)
    assert await eventually(lambda: docker_left(docker_client, km.kernel_id)) == []


async def docker_left(client: Any, kernel_id: str) -> list[str]:
    """What is left of Docker kernel ``kernel_id``: containers, port records, removals."""
    found = client.api.containers(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={kernel_id}"}
    )
    return (
        [f"container {c['Names'][0].lstrip('/')}" for c in found]
        + held_ports()
        + pending_removals()
    )

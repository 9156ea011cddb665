"""Engine faults under a running kernel: the engine goes away, the kernel is reported dead,
cleanup still succeeds and leaves nothing behind."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from provisioners.connection.ports import ClusterPortCache
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, count, execute

REPO = Path(__file__).resolve().parents[2]


def restart_dockerd() -> None:
    """Stop this machine's dockerd (its containers stop with it) and start it again."""
    daemons = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "dockerd"]
    assert daemons, "no dockerd process on this machine to restart"
    for daemon in daemons:
        daemon.terminate()
    psutil.wait_procs(daemons, timeout=60)
    subprocess.run(["bash", str(REPO / ".ci/lib/docker.sh")], check=True, timeout=120)


@pytest.mark.docker
@pytest.mark.disruptive
async def test_dockerd_restart_under_a_running_kernel(kernel_manager, docker_client) -> None:
    km = kernel_manager(
        "cluster-docker-provisioner", {"image": KERNEL_TEST_IMAGE}, argv=CONTAINER_ARGV
    )
    await km.start_kernel()
    kernel_id = km.kernel_id
    assert (await execute(km, "print('before')"))["stdout"] == "before\n"

    await asyncio.to_thread(restart_dockerd)
    count("faults injected", "docker")

    deadline = time.monotonic() + 30
    while await km.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not await km.is_alive(), "the provisioner did not notice the kernel died"
    await km.shutdown_kernel(now=True)
    left = docker_client.containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={kernel_id}"}
    )
    count("orphans found after sweep", "docker", len(left))
    assert left == []
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.k8s
async def test_pod_deleted_behind_our_back_then_restart(kernel_manager, kube) -> None:
    """Poll reports the deleted pod; a restart starts a new pod that answers."""
    from provisioners.k8s.client import KubeClient

    km = kernel_manager("cluster-kubernetes-provisioner", kube.config(), argv=CONTAINER_ARGV)
    await km.start_kernel()
    first_pod = km.provisioner.engine.kernel_state()["pod"]
    client = await KubeClient.connect(kube.kubeconfig)
    try:
        await client.request(
            "DELETE",
            f"/api/v1/namespaces/{kube.namespace}/pods/{first_pod}",
            query=[("gracePeriodSeconds", "0")],
        )
        count("faults injected", "kubernetes")
        deadline = time.monotonic() + 20
        while await km.is_alive():
            assert time.monotonic() < deadline, "poll() never noticed the pod was deleted"
            await asyncio.sleep(0.2)
        await km.restart_kernel(now=True)
        second_pod = km.provisioner.engine.kernel_state()["pod"]
        assert second_pod != first_pod
        assert (await execute(km, "print('new pod')"))["stdout"] == "new pod\n"
    finally:
        await km.shutdown_kernel(now=True)
        await client.close()


@pytest.mark.ssh
async def test_ssh_connection_dropped_under_a_running_kernel(kernel_manager, ssh_engine) -> None:
    """sshd's side of the connection dies; the next request re-tunnels, same kernel."""
    from tests.targets import ssh_case

    case = ssh_case(*ssh_engine)
    sshd, _ = ssh_engine
    km = kernel_manager(case.provisioner, **case.spec())
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        assert (await kc.execute_interactive("x = 41", timeout=30))["content"]["status"] == "ok"
        pid = km.provisioner.engine.kernel_state()["pid"]
        sessions = psutil.Process(sshd.proc.pid).children()
        assert sessions, "no SSH session to drop"
        for session in sessions:  # the per-connection sshd processes: the link drops
            session.kill()
        count("faults injected", "ssh")
        await asyncio.sleep(0.5)
        reply = await kc.execute_interactive("assert x == 41; print('same kernel')", timeout=60)
        assert reply["content"]["status"] == "ok"
        assert km.provisioner.engine.kernel_state()["pid"] == pid
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    assert case.leftovers(km.kernel_id) == []

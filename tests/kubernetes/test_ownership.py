"""Kernel ownership the cluster can answer for: the server's pod, not its hostname.

In the chart the server's hostname is its pod name, so a replaced (evicted, rescheduled)
server never recognised its predecessor's kernels as orphans: the process identity
``host.pid.start`` names another machine and is assumed alive. The provisioner now also
records the server pod (``namespace/name/uid``): an ownerReference in the same namespace
(the cluster deletes the kernel with its server), and an annotation the sweep checks
against the API. ``cleanup --release`` removes an installation's kernels (the chart's
uninstall hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeApiError, KubeClient, NotFound
from provisioners.k8s.sweep import sweep_orphans
from tests.helpers import KUBERNETES_PROVISIONER, Kube, async_wait_for
from tests.helpers.kube import dead_identity, get_pod, pod_of

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

MakeKM = Callable[..., AsyncKernelManager]
#: A process identity as a replaced server pod left it: another hostname, assumed alive.
OLD_POD_PROCESS = "server-7c9d-old.7.12345"


async def exists(api: KubeClient, path: str) -> bool:
    try:
        await api.request("GET", path, retries=0)
    except NotFound:
        return False
    return True


@pytest.fixture
async def pods(kube: Kube, kube_api: KubeClient) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """make(name, command=..., manifest=None) -> created pod; all deleted after the test."""
    made: list[tuple[str, str]] = []

    async def make(name: str, command: tuple[str, ...] = ("sleep", "300"), body: Any = None) -> Any:
        ns = kube.namespace
        if body is None:
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": {"test": "fake-server"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "server", "image": kube.image, "command": command}],
                },
            }
        created = await kube_api.request("POST", f"/api/v1/namespaces/{ns}/pods", body=body)
        made.append((ns, name))
        return created

    yield make
    for ns, name in made:
        path = f"/api/v1/namespaces/{ns}/pods/{name}"
        with contextlib.suppress(KubeApiError):
            await kube_api.request("DELETE", path, query=[("gracePeriodSeconds", "0")])
    for ns, name in made:
        path = f"/api/v1/namespaces/{ns}/pods/{name}"
        await async_wait_for(lambda path=path: _gone(kube_api, path), 20, interval=0.25)


async def _gone(api: KubeClient, path: str) -> bool:
    return not await exists(api, path)


def server_pod_text(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{meta['name']}/{meta['uid']}"


def kernel_pod(kube: Kube, tag: str, process: str, owner_pod: str, **extra: Any) -> dict[str, Any]:
    name = m.pod_name("owned", f"{tag}-{uuid.uuid4().hex[:6]}")
    spec = m.KernelPod(
        name=name,
        namespace=kube.namespace,
        image=kube.image,
        command=("sleep", "300"),
        ports=(20001, 20002, 20003, 20004, 20005),
        kernel_id=f"owned-{tag}",
        secret_name=m.secret_name_for(name),
        owner=process,
        owner_pod=owner_pod,
        grace_period=0,
        **extra,
    )
    return m.pod_manifest(spec)


async def test_a_kernel_in_the_servers_namespace_is_collected_with_the_server_pod(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, pods: Any
) -> None:
    server = await pods(f"server-gc-{uuid.uuid4().hex[:6]}")
    owner = server_pod_text(server)
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(server_pod=owner), **kube.spec())
    await km.start_kernel()
    prov = pod_of(km)
    pod = await get_pod(kube_api, kube, prov.pod_name)
    meta = pod["metadata"]
    assert meta["annotations"][m.ANNOTATION_OWNER_POD] == owner
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": server["metadata"]["name"],
         "uid": server["metadata"]["uid"]}
    ]  # fmt: skip
    # The server pod goes (deleted by hand, its node lost, the release uninstalled).
    ns = kube.namespace
    server_path = f"/api/v1/namespaces/{ns}/pods/{server['metadata']['name']}"
    await kube_api.request("DELETE", server_path, query=[("gracePeriodSeconds", "0")])
    kernel_path = f"/api/v1/namespaces/{ns}/pods/{prov.pod_name}"
    secret_path = f"/api/v1/namespaces/{ns}/secrets/{prov.secret_name}"
    assert await async_wait_for(
        lambda: _gone(kube_api, kernel_path), 30, "the kernel pod collected", 0.25
    )
    assert await async_wait_for(
        lambda: _gone(kube_api, secret_path), 15, "the Secret collected", 0.25
    )
    await km.shutdown_kernel(now=True)


def test_no_owner_reference_across_namespaces() -> None:
    """The collector treats an owner in another namespace as absent: it would delete the
    kernel at once, so such kernels only carry the annotation."""
    same = m.server_pod_reference("jupyter/server-1/uid-1", "jupyter")
    assert same == {"apiVersion": "v1", "kind": "Pod", "name": "server-1", "uid": "uid-1"}
    assert m.server_pod_reference("jupyter/server-1/uid-1", "jupyter-kernels") is None
    assert m.server_pod_reference("", "jupyter") is None


async def test_sweep_removes_kernels_of_gone_server_pods_never_a_live_ones(
    kube: Kube, kube_api: KubeClient, pods: Any
) -> None:
    ns = kube.namespace
    live = await pods(f"server-live-{uuid.uuid4().hex[:6]}")
    ended = await pods(f"server-ended-{uuid.uuid4().hex[:6]}", ("true",))
    assert await async_wait_for(
        lambda: _phase_is(kube_api, ns, ended["metadata"]["name"], "Succeeded"), 30, interval=0.25
    )
    live_text, ended_text = server_pod_text(live), server_pod_text(ended)
    owners = {
        # deleted: no such pod any more
        "deleted": f"{ns}/server-deleted-{uuid.uuid4().hex[:6]}/{uuid.uuid4()}",
        # replaced: a pod of that name exists, with another uid
        "replaced": f"{ns}/{live['metadata']['name']}/{uuid.uuid4()}",
        # ended (evicted, OOM-killed for good): the pod object stays, in a final phase
        "ended": ended_text,
        "live": live_text,
    }
    names: dict[str, str] = {}
    for tag, owner in owners.items():
        # no ownerReference: as for kernels in a namespace of their own
        body = kernel_pod(kube, tag, OLD_POD_PROCESS, owner, owner_reference=False)
        names[tag] = (await pods(body["metadata"]["name"], body=body))["metadata"]["name"]
    # A kernel started from this very pod: its restarted server process is gone.
    body = kernel_pod(kube, "restarted", str(dead_identity()), live_text, owner_reference=False)
    names["restarted"] = (await pods(body["metadata"]["name"], body=body))["metadata"]["name"]

    log = logging.getLogger("test")
    swept_before: list[str] = []
    if kube.forbid is not None:  # an owner pod that cannot be checked: its kernels are kept
        denial = kube.forbid("get", "pods")
        try:
            swept_before = await sweep_orphans(kube_api, ns, log, live_text)
        finally:
            denial.lift()
        # told by the process, no API needed; the kernels of unchecked server pods are kept
        # (a dead server of another test may have left a kernel in this shared namespace)
        assert names["restarted"] in swept_before
        assert not set(swept_before) & {names[t] for t in ("deleted", "replaced", "ended")}
    swept = swept_before + await sweep_orphans(kube_api, ns, log, live_text)
    for tag in ("deleted", "replaced", "ended", "restarted"):
        assert names[tag] in swept, f"kernel of a {tag} server pod was not swept"
    assert names["live"] not in swept
    await get_pod(kube_api, kube, names["live"])


async def _phase_is(api: KubeClient, ns: str, name: str, phase: str) -> bool:
    pod = await api.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
    return (pod.get("status") or {}).get("phase") == phase


async def test_cleanup_release_removes_every_kernel_of_the_installation(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, pods: Any
) -> None:
    release = f"jupyter.rel-{uuid.uuid4().hex[:6]}"
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(release=release), **kube.spec())
    await km.start_kernel()
    prov = pod_of(km)
    other = kernel_pod(kube, "other", OLD_POD_PROCESS, "", release="jupyter.other")
    other_name = (await pods(other["metadata"]["name"], body=other))["metadata"]["name"]

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "provisioners", "cleanup", "--release", release,
         "--namespace", kube.namespace, "--kubeconfig", kube.kubeconfig],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"removed {kube.namespace}/{prov.pod_name}" in proc.stdout
    assert f"removed {kube.namespace}/{prov.secret_name}" in proc.stdout
    ns = kube.namespace
    assert await async_wait_for(
        lambda: _gone(kube_api, f"/api/v1/namespaces/{ns}/pods/{prov.pod_name}"), 30, interval=0.25
    )
    assert not await exists(kube_api, f"/api/v1/namespaces/{ns}/secrets/{prov.secret_name}")
    await get_pod(kube_api, kube, other_name)  # another installation's kernel stays
    await km.shutdown_kernel()

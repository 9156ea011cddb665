"""Helpers of the Kubernetes tests: what a test left in the cluster, pools, pods.

The ``kube`` fixture (:class:`tests.helpers.Kube`) comes from tests/engine_fixtures.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners.connection.ports import ClusterPortCache, process_start_time
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeApiError, KubeClient, resource_path
from provisioners.k8s.engine import PodEngine
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from provisioners.k8s.watch import describe_progress
from provisioners.lifecycle import leftovers as removals
from provisioners.lifecycle.owner import ServerIdentity
from provisioners.pool.pools import KernelPools
from provisioners.pool.warm import WarmPool
from tests.helpers import LEFTOVER_WAIT, Kube, async_wait_for, wait_for_no_leftovers


async def reachable(kubeconfig: str, namespace: str) -> str:
    """'' when ``namespace``'s pods can be listed, else why not."""
    try:
        client = await KubeClient.connect(kubeconfig)
    except Exception as exc:
        return str(exc)
    try:
        await client.request("GET", resource_path("pods", namespace), retries=0)
    except KubeApiError as exc:
        return str(exc)
    finally:
        await client.close()
    return ""


async def leftovers(client: KubeClient, namespace: str, kernel_id: str = "") -> list[str]:
    """What is left in ``namespace`` now: the kernel pods and Secrets of this process (or,
    given ``kernel_id``, of that kernel, whichever process started it) with their state,
    the Kubernetes removals still pending here and, for ``kernel_id``, its live port
    records."""
    owner = m.sanitize_label_value(str(ServerIdentity.current()))
    selector = m.KERNEL_SELECTOR if kernel_id else f"{m.KERNEL_SELECTOR},{m.LABEL_OWNER}={owner}"
    found = []
    for kind in ("pods", "secrets"):
        path = resource_path(kind, namespace)
        data = await client.request("GET", path, query=[("labelSelector", selector)])
        for item in data.get("items") or []:
            md = item["metadata"]
            if kernel_id and (md.get("annotations") or {}).get(m.ANNOTATION_KERNEL_ID) != kernel_id:
                continue
            state = describe_progress(item) if kind == "pods" else "present"
            deleted = md.get("deletionTimestamp") or "none"
            found.append(f"{kind}/{md['name']} ({state}; deletionTimestamp {deleted})")
    for prov in removals.pending():
        if prov.target == "kubernetes" and kernel_id in ("", prov.kernel_id):
            found.append(f"pending removal of kernel {prov.kernel_id}: {prov._removal_error}")
    if kernel_id:
        held = ClusterPortCache.instance().held()
        found += [
            f"port record {host}:{port} of {record.get('owner')}"
            for host, ports in held.items()
            for port, record in ports.items()
            if kernel_id in str(record.get("owner", ""))
        ]
    return found


async def no_leftovers(
    client: KubeClient, namespace: str, kernel_id: str = "", timeout: float = LEFTOVER_WAIT
) -> None:
    """Wait until :func:`leftovers` finds nothing (a real kubelet takes its time to remove
    pods); fail after ``timeout`` s naming what is left and its state."""
    what = f"kernel {kernel_id}" if kernel_id else f"this process's kernels in {namespace}"
    await wait_for_no_leftovers(lambda: leftovers(client, namespace, kernel_id), what, timeout)


def new_provisioner(km: AsyncKernelManager) -> KubernetesClusterProvisioner:
    """A provisioner of ``km``'s kernelspec."""
    prov = KernelProvisionerFactory.instance().create_provisioner_instance(
        str(uuid.uuid4()), km.kernel_spec, km
    )
    assert isinstance(prov, KubernetesClusterProvisioner)
    return prov


async def filled(km: AsyncKernelManager, ready: int, timeout: float = 180) -> WarmPool:
    """Create the pool of ``km``'s kernelspec (as its first claim would) and wait until
    ``ready`` warm kernels are ready."""
    KernelPools.instance().ensure(new_provisioner(km))
    return await ready_pool(km.kernel_name, ready, timeout)


async def ready_pool(spec_name: str, ready: int, timeout: float = 180) -> WarmPool:
    """The pool of kernelspec ``spec_name`` once it has ``ready`` warm kernels ready."""

    def check() -> WarmPool | None:
        found = [p for p in KernelPools.instance().pools() if p.spec_name == spec_name]
        return found[0] if found and len(found[0].ready) >= ready else None

    what = f"pool {spec_name!r} at {ready} ready"
    pool: WarmPool = await async_wait_for(check, timeout, what, interval=0.2)
    return pool


def provisioner_of(km: AsyncKernelManager) -> KubernetesClusterProvisioner:
    """``km``'s provisioner, checked to be the Kubernetes one."""
    prov = km.provisioner
    assert isinstance(prov, KubernetesClusterProvisioner)
    return prov


def pod_of(km: AsyncKernelManager) -> PodEngine:
    """The engine that runs ``km``'s pod (a claimed warm kernel's, or its own)."""
    engine = provisioner_of(km).engine
    assert isinstance(engine, PodEngine)
    return engine


async def get_pod(api: KubeClient, kube: Kube, name: str) -> dict[str, Any]:
    """Pod ``name`` of the test namespace."""
    return await api.request("GET", resource_path("pods", kube.namespace, name))


def dead_identity() -> ServerIdentity:
    """The identity of a server process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(proc.pid)
    proc.wait()
    return ServerIdentity(socket.gethostname(), proc.pid, start or "1")


def hostpath_volume(
    name: str, path: str, namespace: str, claim: str, labels: dict[str, str]
) -> dict[str, Any]:
    """A hostPath PersistentVolume ``name`` (a directory of this machine, which the test
    node shares) pre-bound to claim ``namespace/claim``: the test node provisions no
    storage."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": path, "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }


async def bind_claim(
    kube: Kube, api: KubeClient, claim: str, root: Path, *, prefix: str, label: str
) -> None:
    """On a real cluster: a hostPath PersistentVolume ``<prefix>-<claim>`` (labelled
    ``cluster-provisioners-test=<label>``) pre-bound to ``claim``, on a directory under
    ``root`` the kernel (jovyan, 1000) may write. The double binds claims itself."""
    if kube.forbid is not None:
        return
    (root / claim).mkdir(parents=True)
    (root / claim).chmod(0o777)
    labels = {"cluster-provisioners-test": label}
    volume = hostpath_volume(f"{prefix}-{claim}", str(root / claim), kube.namespace, claim, labels)
    await api.request("POST", "/api/v1/persistentvolumes", body=volume)

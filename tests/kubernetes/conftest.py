"""Where the Kubernetes tests run: the in-repo API double, or a real cluster ($KUBECONFIG).

No test knows which one it has: both speak the real Kubernetes API. With ``KUBECONFIG``
set, the tests use its current context, the namespace
``$CLUSTER_PROVISIONERS_TEST_NAMESPACE`` (default ``default``) and the image
``$CLUSTER_PROVISIONERS_TEST_IMAGE``, which the cluster's nodes must have.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners import leftovers as removals
from provisioners.connection.ports import ClusterPortCache
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeApiError, KubeClient
from provisioners.k8s.loop import EngineLoop
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from provisioners.k8s.watch import describe_progress
from provisioners.owner import ServerIdentity
from provisioners.pool.pools import KernelPools
from provisioners.pool.warm import WarmPool
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    LEFTOVER_WAIT,
    skip_or_fail,
    wait_for_no_leftovers,
)

try:  # the double's own fixture, written alongside (tests/kubernetes/apidouble/)
    from tests.kubernetes.apidouble.fixtures import k8s_double, kube_double  # noqa: F401

    _DOUBLE_ERROR = ""
except Exception as exc:  # a missing or broken double is reported by the fixture
    _DOUBLE_ERROR = f"{type(exc).__name__}: {exc}"

PROVISIONER = "cluster-kubernetes-provisioner"
NAMESPACE_ENV = "CLUSTER_PROVISIONERS_TEST_NAMESPACE"


@dataclass(frozen=True)
class Kube:
    """A Kubernetes API to test against."""

    kubeconfig: str
    namespace: str
    image: str = KERNEL_TEST_IMAGE
    #: Makes the API answer 403 to ``(verb, resource)`` until the returned object's
    #: ``lift()``; only the double has one (None on a real cluster).
    forbid: Callable[[str, str], Any] | None = None

    def config(self, **extra: Any) -> dict[str, Any]:
        """Provisioner config for a kernelspec starting kernels there."""
        config: dict[str, Any] = {
            "kubeconfig": self.kubeconfig,
            "namespace": self.namespace,
            "image": self.image,
            "fallback": "none",
            "launch_timeout": 60.0,
            "termination_grace_period": 1,
        }
        config.update(extra)
        return config

    def spec(self, **extra: Any) -> dict[str, Any]:
        """Kernelspec fields for ``kernel_manager`` (argv as the image runs it)."""
        return {"argv": list(CONTAINER_ARGV), **extra}


async def _reachable(kubeconfig: str, namespace: str) -> str:
    """'' when ``namespace``'s pods can be listed, else why not."""
    try:
        client = await KubeClient.connect(kubeconfig)
    except Exception as exc:
        return str(exc)
    try:
        await client.request("GET", f"/api/v1/namespaces/{namespace}/pods", retries=0)
    except KubeApiError as exc:
        return str(exc)
    finally:
        await client.close()
    return ""


@pytest.fixture(autouse=True)
def _engine_loop_released() -> Iterator[None]:
    """After each test (and its managers' teardown), no provisioner it made still holds
    the Kubernetes engine loop: every start, failed or not, lets go of it."""
    before = EngineLoop.holders()
    yield
    leaked = EngineLoop.holders() - before
    assert not leaked, f"{len(leaked)} provisioner(s) still hold the Kubernetes engine loop"


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """The double's kubeconfig by default, or the real cluster's when $KUBECONFIG is set."""
    if os.environ.get("KUBECONFIG"):
        target = Kube(os.environ["KUBECONFIG"], os.environ.get(NAMESPACE_ENV, "default"))
    else:
        if _DOUBLE_ERROR:
            skip_or_fail("k8s", f"the Kubernetes API double cannot be loaded ({_DOUBLE_ERROR})")
        double = request.getfixturevalue("kube_double")
        target = Kube(double.kubeconfig, double.namespace, forbid=double.forbid)
    problem = asyncio.run(_reachable(target.kubeconfig, target.namespace))
    if problem:
        skip_or_fail("k8s", f"the Kubernetes API cannot be used: {problem}")
    yield target


@pytest.fixture
async def kube_api(kube: Kube) -> AsyncIterator[KubeClient]:
    """A client of the test API; after the test, checks that this process left no
    kernel pod, Secret or pending removal behind (waiting as long as the engine needs)."""
    client = await KubeClient.connect(kube.kubeconfig)
    try:
        yield client
        await no_leftovers(client, kube.namespace)
    finally:
        await client.close()


async def leftovers(client: KubeClient, namespace: str, kernel_id: str = "") -> list[str]:
    """What is left in ``namespace`` now: the kernel pods and Secrets of this process (or,
    given ``kernel_id``, of that kernel, whichever process started it) with their state,
    the Kubernetes removals still pending here and, for ``kernel_id``, its live port
    records."""
    owner = m.sanitize_label_value(str(ServerIdentity.current()))
    selector = m.KERNEL_SELECTOR if kernel_id else f"{m.KERNEL_SELECTOR},{m.LABEL_OWNER}={owner}"
    found = []
    for kind in ("pods", "secrets"):
        path = f"/api/v1/namespaces/{namespace}/{kind}"
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
    """A provisioner of ``km``'s kernelspec (the first one creates the kernelspec's pool)."""
    prov = KernelProvisionerFactory.instance().create_provisioner_instance(
        str(uuid.uuid4()), km.kernel_spec, km
    )
    assert isinstance(prov, KubernetesClusterProvisioner)
    return prov


async def filled(km: AsyncKernelManager, ready: int, timeout: float = 180) -> WarmPool:
    """Create the pool of ``km``'s kernelspec (as its first provisioner would) and wait
    until ``ready`` warm kernels are ready."""
    new_provisioner(km)
    return await ready_pool(km.kernel_name, ready, timeout)


async def ready_pool(spec_name: str, ready: int, timeout: float = 180) -> WarmPool:
    """The pool of kernelspec ``spec_name`` once it has ``ready`` warm kernels ready."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in KernelPools.instance().pools() if p.spec_name == spec_name]
        if found and len(found[0].ready) >= ready:
            return found[0]
        assert time.monotonic() < deadline, f"pool {spec_name!r} not at {ready} ready in time"
        await asyncio.sleep(0.2)

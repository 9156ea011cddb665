"""Launch parameters on Kubernetes: the pod manifest (pure) carries the requested
resources and image; on the ``kube`` API (the double, or a real node) a kernel started
with parameters runs in such a pod, and a bad value creates nothing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from provisioners.connection.files import PORT_NAMES
from provisioners.connection.ports import ClusterPortCache
from provisioners.k8s import KubernetesClusterProvisioner
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient
from provisioners.parameters import LaunchBounds, LaunchParameterError
from provisioners.persist import adopt_kernels
from tests.helpers import KUBERNETES_PROVISIONER, Kube, execute
from tests.helpers.kube import get_pod, no_leftovers, pod_of

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

MakeKM = Callable[..., AsyncKernelManager]


def schema(image: str) -> dict[str, Any]:
    return {
        "cpu": {"type": "number", "minimum": 0.1, "maximum": 2, "default": 1},
        "memory": {"type": "string", "minimum": "128Mi", "maximum": "2Gi", "default": "1Gi"},
        "gpus": {"type": "integer", "minimum": 0, "maximum": 1, "default": 0},
        "image": {"type": "string", "enum": [image, "kernel:other"], "default": image},
        "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
    }


@pytest.fixture(autouse=True)
def fresh_bounds() -> Iterator[None]:
    LaunchBounds.clear_instance()
    yield
    LaunchBounds.clear_instance()


def test_the_pod_manifest_carries_the_requested_resources_and_image() -> None:
    spec = KernelSpec(
        argv=["python"],
        display_name="k8s-params",
        resource_dir="/k/k8s-params",
        metadata={"parameters": schema("kernel:py3")},
    )
    prov = KubernetesClusterProvisioner(
        kernel_id="k-params", kernel_spec=spec, image="kernel:py3", namespace="kernels"
    )
    env = {"KERNEL_CPU": "0.25", "KERNEL_MEMORY": "512Mi", "KERNEL_GPUS": "1"}
    prov.apply_launch_parameters({**env, "KERNEL_IMAGE": "kernel:other", "KERNEL_MODE": "exact"})
    engine = prov.engine
    engine.kernel_info = {name: 50000 + i for i, name in enumerate(PORT_NAMES)}
    pod = m.pod_manifest(engine.pod_spec(["python3"], {}))
    kernel = pod["spec"]["containers"][0]
    assert kernel["image"] == "kernel:other"
    assert kernel["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "250m", "memory": "512Mi", "nvidia.com/gpu": "1"},
    }
    assert prov.env == {"KERNEL_MODE": "exact"}
    # env values are data: the kubelet's $(NAME) expansion and '$$' never apply to them
    literal = m.pod_manifest(engine.pod_spec(["python3"], {"KERNEL_NOTE": "$(HOME) $$ $"}))
    note = literal["spec"]["containers"][0]["env"]
    assert note == [{"name": "KERNEL_NOTE", "value": "$$(HOME) $$$$ $$"}]
    # another kernel of the kernelspec: the schema's defaults, not the other's values
    other = KubernetesClusterProvisioner(
        kernel_id="k-other", kernel_spec=spec, image="kernel:py3", namespace="kernels"
    )
    other.apply_launch_parameters({})
    other.engine.kernel_info = engine.kernel_info
    resources = m.pod_manifest(other.engine.pod_spec(["python3"], {}))["spec"]["containers"][0]
    assert resources["image"] == "kernel:py3"
    assert resources["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }


async def test_a_kernel_started_with_parameters_runs_in_such_a_pod(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(
        KUBERNETES_PROVISIONER,
        kube.config(connection_mode="port-forward"),
        metadata={"parameters": schema(kube.image)},
        **kube.spec(),
    )
    env = {"KERNEL_CPU": "0.2", "KERNEL_MEMORY": "256Mi", "KERNEL_MODE": "exact"}
    await km.start_kernel(env=env)
    pod = await get_pod(kube_api, kube, pod_of(km).pod_name)
    kernel = pod["spec"]["containers"][0]
    assert kernel["resources"]["requests"] == {"cpu": "200m", "memory": "256Mi"}
    assert kernel["resources"]["limits"] == {"cpu": "200m", "memory": "256Mi"}
    out = await execute(km, "import os; print(os.environ['KERNEL_MODE'])")
    assert out["stdout"] == "exact\n"
    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_a_bad_value_creates_no_pod_and_holds_no_port(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(
        KUBERNETES_PROVISIONER,
        kube.config(connection_mode="port-forward"),
        metadata={"parameters": schema(kube.image)},
        **kube.spec(),
    )
    began = time.monotonic()
    with pytest.raises(LaunchParameterError) as caught:
        await km.start_kernel(env={"KERNEL_MEMORY": "9999Ti"})
    assert time.monotonic() - began < 5
    assert caught.value.parameter == "memory" and "above the maximum" in str(caught.value)
    assert ClusterPortCache.instance().held() == {}
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_an_adopted_kernel_restarts_in_a_pod_with_its_parameters(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = kube.config(connection_mode="port-forward", persist_kernels=True)
    km = kernel_manager(
        KUBERNETES_PROVISIONER,
        config,
        metadata={"parameters": schema(kube.image)},
        name=f"params-{uuid.uuid4().hex[:8]}",  # adoption looks for kernels by kernelspec
        **kube.spec(),
    )
    await km.start_kernel(env={"KERNEL_CPU": "0.2", "KERNEL_MODE": "exact"})
    pod = await get_pod(kube_api, kube, pod_of(km).pod_name)
    recorded = json.loads(pod["metadata"]["annotations"][m.ANNOTATION_LAUNCH_ENV])
    assert recorded == {"KERNEL_CPU": "0.2", "KERNEL_MODE": "exact"}  # the chosen ones only
    assert await km.provisioner.detach()  # the server stops; the kernel lives on
    ClusterPortCache.instance().release(pod_of(km).allocation_owner)  # with its process

    # the next server adopts it; a restart (a new pod, no start request) keeps the values
    kernel_dir = Path(km.kernel_spec.resource_dir).parent
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir.parent))
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    assert km.kernel_id in await adopt_kernels(mkm)
    adopted = mkm.get_kernel(km.kernel_id)
    await mkm.restart_kernel(km.kernel_id)
    pod = await get_pod(kube_api, kube, pod_of(adopted).pod_name)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "200m"
    code = "import os; print(os.environ['KERNEL_MODE'])"
    assert (await execute(dict(adopted.get_connection_info()), code))["stdout"] == "exact\n"
    await mkm.shutdown_kernel(km.kernel_id, now=True)
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)

"""Every target as a test case, for the suites that check all targets at once.

A :class:`TargetCase` says how to write a kernelspec for one engine, and how to read
what that engine shows of a kernel (``docker inspect``, a pod, a remote command line),
so the security and fault suites run the same table on every target.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, LOCAL_ARGV


@dataclass
class TargetCase:
    """One engine's kernelspec recipe and inspection hook."""

    name: str
    provisioner: str
    argv: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    #: Returns, as text, everything the engine exposes about a running kernel
    #: (may be a coroutine function).
    inspect: Callable[[AsyncKernelManager], Any] = lambda km: ""
    #: Names of what the engine still holds for a kernel id: processes, containers, pods
    #: (may be a coroutine function).
    leftovers: Callable[[str], Any] = lambda kernel_id: []
    #: Names the engine gave the kernel's objects (container, pod, Secret, remote dir);
    #: each must stay in a safe alphabet whatever the user sent (may be a coroutine).
    names: Callable[[AsyncKernelManager], Any] = lambda km: []

    def spec(self, **extra_config: Any) -> dict[str, Any]:
        """Keyword arguments for the ``kernel_manager`` fixture."""
        return {"config": {**self.config, **extra_config}, "argv": self.argv}


def local_case() -> TargetCase:
    def inspect(km: AsyncKernelManager) -> str:
        import psutil

        proc = psutil.Process(km.provisioner.engine.pid)
        return json.dumps({"cmdline": proc.cmdline(), "environ": proc.environ()})

    def leftovers(kernel_id: str) -> list[str]:
        found = _processes_with(kernel_id)
        runtime = Path(jupyter_runtime_dir())
        found += [str(p) for p in runtime.glob(f"*{kernel_id}*")]
        return found

    return TargetCase(
        "local",
        "cluster-local-provisioner",
        LOCAL_ARGV,
        {"inherit_server_env": False},
        inspect,
        leftovers,
    )


def docker_case(client: Any) -> TargetCase:
    def inspect(km: AsyncKernelManager) -> str:
        container = client.containers.get(km.provisioner.engine.kernel_state()["container_id"])
        return json.dumps(container.attrs)

    def leftovers(kernel_id: str) -> list[str]:
        found = client.api.containers(
            all=True, filters={"label": f"cluster-provisioners.kernel-id={kernel_id}"}
        )
        return [f"container {c['Names'][0].lstrip('/')}" for c in found]

    def names(km: AsyncKernelManager) -> list[str]:
        return [km.provisioner.engine.kernel_state()["container_name"]]

    return TargetCase(
        "docker",
        "cluster-docker-provisioner",
        CONTAINER_ARGV,
        {"image": KERNEL_TEST_IMAGE},
        inspect,
        leftovers,
        names,
    )


def _processes_with(kernel_id: str) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(kernel_id in arg for arg in proc.info["cmdline"] or []):
            found.append(f"process {proc.info['pid']}")
    return found


def ssh_case(sshd: Any, remote_runtime: Path) -> TargetCase:
    """The SSH target on a loopback sshd; the "remote" host is this machine."""
    import sys

    def inspect(km: AsyncKernelManager) -> str:
        import psutil

        state = km.provisioner.engine.kernel_state()
        proc = psutil.Process(state["pid"])
        launcher = Path(state["kernel_dir"]) / "launch.sh"
        return json.dumps(
            {
                "cmdline": proc.cmdline(),
                "environ": proc.environ(),
                "launcher": launcher.read_text() if launcher.exists() else "",
            }
        )

    def leftovers(kernel_id: str) -> list[str]:
        found = _processes_with(kernel_id)
        found += [str(p) for p in remote_runtime.glob(f"*{kernel_id}*")]
        return found

    config = sshd.kernel_config(remote_runtime)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]

    def names(km: AsyncKernelManager) -> list[str]:
        return [Path(km.provisioner.engine.kernel_state()["kernel_dir"]).name]

    return TargetCase("ssh", "cluster-ssh-provisioner", argv, config, inspect, leftovers, names)


def kubernetes_case(kube: Any) -> TargetCase:
    """``kube``: the Kubernetes suite's target (the API double, or $KUBECONFIG)."""
    from provisioners.k8s import manifests as m
    from provisioners.k8s.client import KubeClient

    async def inspect(km: AsyncKernelManager) -> str:
        state = km.provisioner.engine.kernel_state()
        client = await KubeClient.connect(kube.kubeconfig)
        try:
            pod = await client.request(
                "GET", f"/api/v1/namespaces/{kube.namespace}/pods/{state['pod']}"
            )
        finally:
            await client.close()
        return json.dumps(pod)

    async def leftovers(kernel_id: str) -> list[str]:
        client = await KubeClient.connect(kube.kubeconfig)
        try:
            found = []
            for kind in ("pods", "secrets"):
                items = await client.request(
                    "GET",
                    f"/api/v1/namespaces/{kube.namespace}/{kind}",
                    query=[("labelSelector", m.KERNEL_SELECTOR)],
                )
                for item in items.get("items") or []:
                    annotations = item["metadata"].get("annotations") or {}
                    if annotations.get(m.ANNOTATION_KERNEL_ID) == kernel_id:
                        found.append(f"{kind}/{item['metadata']['name']}")
            return found
        finally:
            await client.close()

    async def names(km: AsyncKernelManager) -> list[str]:
        """Every pod and Secret name in the namespace (a YAML document smuggled in a
        value would show up here as an extra object), and our pod's label values."""
        client = await KubeClient.connect(kube.kubeconfig)
        try:
            found = []
            for kind in ("pods", "secrets"):
                items = await client.request("GET", f"/api/v1/namespaces/{kube.namespace}/{kind}")
                found += [item["metadata"]["name"] for item in items.get("items") or []]
            state = km.provisioner.engine.kernel_state()
            pod = await client.request(
                "GET", f"/api/v1/namespaces/{kube.namespace}/pods/{state['pod']}"
            )
            found += [v for v in (pod["metadata"].get("labels") or {}).values() if v]
            return found
        finally:
            await client.close()

    return TargetCase(
        "kubernetes",
        "cluster-kubernetes-provisioner",
        CONTAINER_ARGV,
        kube.config(),
        inspect,
        leftovers,
        names,
    )


async def resolve(value: Any) -> Any:
    """``value``, awaited when it is awaitable (TargetCase hooks may be either)."""
    import inspect as _inspect

    return await value if _inspect.isawaitable(value) else value

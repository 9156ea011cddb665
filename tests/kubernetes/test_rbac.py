"""The chart's Roles grant exactly what the provisioner calls: no more, no less.

On the API double, every RBAC check is recorded while the provisioner runs a whole cycle
in each connection mode: start, execute, interrupt (exec), restart, shutdown, a warm pool
filled and a kernel claimed from it (the claim patches the pod and its Secret), a start that
fails (its log), the orphan sweep (asking for a gone server pod), the kernel list and the
uninstall hook's ``cleanup --release``. Kernels run in a namespace of their own, the server
pod in the release namespace, as the chart installs them. The Roles `helm template`
renders for that layout, with a pool, must grant exactly the (verb, resource) pairs seen,
per namespace; without a pool, the same but ``patch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.manager import AsyncKernelManager

from provisioners.exceptions import KernelStartError
from provisioners.k8s import manifests as m
from provisioners.k8s.client import Conflict, KubeClient
from provisioners.k8s.sweep import list_kernel_pods, sweep_orphans
from provisioners.pool.pools import KernelPools
from tests.helpers import KUBERNETES_PROVISIONER, Kube, execute, skip_or_fail
from tests.helpers.kube import filled

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cluster-provisioners"
RELEASE = "rbac"
MakeKM = Callable[..., AsyncKernelManager]
Grants = dict[str, set[tuple[str, str]]]
#: What only a warm pool's claim needs (the chart grants it when a kernelspec has a pool).
POOL_GRANTS = {("patch", "pods"), ("patch", "secrets")}


def find_helm() -> str:
    for path in (
        os.environ.get("HELM", ""),
        str(Path(os.environ.get("CLUSTER_PROVISIONERS_CACHE", "/nonexistent")) / "bin/helm"),
        str(Path.home() / ".cache/cluster-provisioners/bin/helm"),
    ):
        if path and os.access(path, os.X_OK):
            return path
    skip_or_fail("helm", "helm not found: run `bash .ci/lib/helm.sh`")
    raise AssertionError("unreachable")


def rendered_roles(
    release_ns: str, kernel_ns: str, port_forward: bool, pool: bool, persist: bool = True
) -> Grants:
    """(verb, resource) pairs each rendered Role grants, by namespace (``persist``: the
    chart's kernels.persist, on by default, which needs the pool's patch verbs too)."""
    proc = subprocess.run(
        [find_helm(), "template", RELEASE, str(CHART), "--namespace", release_ns,
         "--set", f"kernels.namespace={kernel_ns}",
         "--set", f"kernels.portForward={str(port_forward).lower()}",
         "--set", f"kernels.pools.sizes.python3={int(pool)}",
         "--set", f"kernels.persist={str(persist).lower()}"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KUBECONFIG": "/nonexistent"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    grants: Grants = {}
    for doc in yaml.safe_load_all(proc.stdout):
        if not doc or doc["kind"] != "Role":
            continue
        pairs = grants.setdefault(doc["metadata"]["namespace"], set())
        for rule in doc["rules"]:
            assert "resourceNames" not in rule, "no named Secrets in this layout"
            pairs.update((v, r) for v in rule["verbs"] for r in rule["resources"])
    return grants


@pytest.fixture
def double(kube: Kube, request: pytest.FixtureRequest) -> Any:
    if kube.forbid is None:
        pytest.skip("records the API calls on the in-repo API double")
    return request.getfixturevalue("kube_double")


async def ensure_namespace(api: KubeClient, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    with contextlib.suppress(Conflict):  # it exists already
        await api.request("POST", "/api/v1/namespaces", body=body)


async def orphan_of_a_gone_server(api: KubeClient, kube: Kube, kernel_ns: str) -> None:
    """A kernel pod whose server pod (in the release namespace) no longer exists."""
    name = m.pod_name("orphan", uuid.uuid4().hex[:8])
    spec = m.KernelPod(
        name=name,
        namespace=kernel_ns,
        image=kube.image,
        command=("sleep", "300"),
        ports=(20001, 20002, 20003, 20004, 20005),
        kernel_id=f"orphan-{name}",
        secret_name=m.secret_name_for(name),
        owner="server-old.7.1",
        owner_pod=f"{kube.namespace}/server-old/{uuid.uuid4()}",
        grace_period=0,
    )
    await api.request("POST", f"/api/v1/namespaces/{kernel_ns}/pods", body=m.pod_manifest(spec))


async def cycle(
    kube: Kube, api: KubeClient, kernel_manager: MakeKM, kernel_ns: str, mode: str, me: str
) -> None:
    """Everything the server and the chart's hook do against the API, in one mode."""
    release = f"{kube.namespace}.{RELEASE}"
    config = kube.config(namespace=kernel_ns, connection_mode=mode, server_pod=me, release=release)
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(interrupt_mode="signal"))
    await km.start_kernel()
    assert (await execute(km, "print(6 * 7)"))["stdout"] == "42\n"
    await km.interrupt_kernel()
    await km.restart_kernel()
    assert (await execute(km, "print('again')"))["stdout"] == "again\n"
    await km.shutdown_kernel()

    # A warm pool fills, a start claims from it (patching its pod and Secret), then drains.
    pooled = kernel_manager(
        KUBERNETES_PROVISIONER, {**config, "pool_size": 1}, **kube.spec(name="pool")
    )
    await filled(pooled, 1)
    await pooled.start_kernel()
    assert pooled.provisioner is not None
    assert pooled.provisioner.engine.claimed_from, "not claimed from the pool"
    assert (await execute(pooled, "print('warm')"))["stdout"] == "warm\n"
    await pooled.shutdown_kernel()
    await KernelPools.instance().drain()

    argv = ["python3", "-c", "import sys; print('no kernel'); sys.exit(3)"]
    failing = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(argv=argv))
    with pytest.raises(KernelStartError):
        await failing.start_kernel()

    log = logging.getLogger("test")
    await sweep_orphans(api, kernel_ns, log, me)  # (the first start may have swept already)
    await list_kernel_pods(api, kernel_ns)
    # The chart's uninstall hook, with a kernel running.
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
    await km.start_kernel()
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "provisioners", "cleanup", "--release", release,
         "--namespace", kernel_ns, "--kubeconfig", kube.kubeconfig],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    await km.shutdown_kernel()


async def test_chart_roles_grant_exactly_the_calls_the_provisioner_makes(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, double: Any
) -> None:
    kernel_ns = "cp-rbac-kernels"
    await ensure_namespace(kube_api, kernel_ns)
    server_name = f"server-{uuid.uuid4().hex[:6]}"
    server = await kube_api.request(
        "POST",
        f"/api/v1/namespaces/{kube.namespace}/pods",
        body={
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": server_name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "s", "image": kube.image, "command": ["sleep", "300"]}],
            },
        },
    )
    me = f"{kube.namespace}/{server_name}/{server['metadata']['uid']}"
    try:
        for mode in ("pod-ip", "port-forward"):
            await orphan_of_a_gone_server(kube_api, kube, kernel_ns)
            mark = len(double.authorizations)
            await cycle(kube, kube_api, kernel_manager, kernel_ns, mode, me)
            seen: Grants = {}
            for verb, resource, ns in double.authorizations[mark:]:
                seen.setdefault(ns or "", set()).add((verb, resource))
            forward = mode == "port-forward"
            if forward:  # SPDY's POST needs create; the websocket fallback's GET needs get
                seen.setdefault(kernel_ns, set()).add(("get", "pods/portforward"))
            roles = rendered_roles(kube.namespace, kernel_ns, forward, pool=True)
            assert set(seen) == set(roles), (mode, seen, roles)
            for ns, granted in roles.items():
                assert granted == seen[ns], (
                    f"{mode}, namespace {ns}: granted but never used "
                    f"{sorted(granted - seen[ns])}; used but not granted "
                    f"{sorted(seen[ns] - granted)}"
                )
            assert seen[kernel_ns] >= POOL_GRANTS
            alone = rendered_roles(kube.namespace, kernel_ns, forward, pool=False, persist=False)
            for ns, granted in alone.items():
                assert granted == seen[ns] - POOL_GRANTS, (mode, ns, "without a pool")
    finally:
        await kube_api.request(
            "DELETE",
            f"/api/v1/namespaces/{kube.namespace}/pods/{server_name}",
            query=[("gracePeriodSeconds", "0")],
        )

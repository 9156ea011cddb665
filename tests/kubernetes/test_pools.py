"""Warm kernel pools on Kubernetes, against the ``kube`` API (the double, or $KUBECONFIG).

A kernelspec with ``pool_size`` keeps that many kernel pods started and answering; a start
claims one: its pod keeps its ``<prefix>-pool-<hex>`` name, while its pod's and Secret's
kernel-id label and annotation are patched to the real kernel id (the pool label goes),
so ``list``, ``cleanup`` and the orphan sweep see it under that id; a SIGKILLed server's
warm and claimed pods are swept. Every test drains its pools and checks that no pod,
Secret or port record is left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.connection.ports import ClusterPortCache
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient
from provisioners.k8s.sweep import list_kernel_pods, sweep_orphans
from provisioners.pool.pools import KernelPools
from tests.helpers import KUBERNETES_PROVISIONER, Kube, async_wait_for, execute, write_kernelspec
from tests.helpers.kube import (
    filled,
    leftovers,
    new_provisioner,
    no_leftovers,
    pod_of,
    provisioner_of,
    ready_pool,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

MakeKM = Callable[..., AsyncKernelManager]


def own_port_owners() -> set[str]:
    """Owners of the port records this process holds."""
    return {
        str(record.get("owner"))
        for ports in ClusterPortCache.instance().held().values()
        for record in ports.values()
        if record.get("pid") == os.getpid()
    }


@pytest.fixture
async def pools(kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM) -> AsyncIterator[Any]:
    """A fresh KernelPools for the test; drained after it, which must leave nothing."""
    KernelPools.clear_instance()
    kernel_pools = KernelPools.instance()
    before = own_port_owners()
    yield kernel_pools
    await kernel_pools.drain()
    KernelPools.clear_instance()
    await no_leftovers(kube_api, kube.namespace)
    left = own_port_owners() - before
    assert not left, f"port records of warm or claimed kernels left: {left}"


async def object_meta(api: KubeClient, kube: Kube, kind: str, name: str) -> dict[str, Any]:
    path = f"/api/v1/namespaces/{kube.namespace}/{kind}/{name}"
    return dict((await api.request("GET", path))["metadata"])


async def warm_pods(api: KubeClient, kube: Kube) -> dict[str, dict[str, Any]]:
    """Our unclaimed warm kernel pods (with the pool label), by name."""
    selector = f"{m.KERNEL_SELECTOR},{m.LABEL_POOL}"
    found = await api.request(
        "GET", f"/api/v1/namespaces/{kube.namespace}/pods", query=[("labelSelector", selector)]
    )
    return {pod["metadata"]["name"]: pod for pod in found.get("items") or []}


async def assert_claimed_as(api: KubeClient, kube: Kube, km: AsyncKernelManager) -> None:
    """The pod and Secret of ``km``'s claimed kernel carry its real id, no pool label,
    and the Secret is still the pod's (owned by it, mounted by it)."""
    runner = pod_of(km)
    assert runner.pod_name.startswith("kernel-pool-"), runner.pod_name
    pod = await api.request("GET", f"/api/v1/namespaces/{kube.namespace}/pods/{runner.pod_name}")
    secret = await object_meta(api, kube, "secrets", runner.secret_name)
    for meta in (pod["metadata"], secret):
        assert meta["labels"][m.LABEL_KERNEL_ID] == m.sanitize_label_value(km.kernel_id)
        assert meta["annotations"][m.ANNOTATION_KERNEL_ID] == km.kernel_id
        assert m.LABEL_POOL not in meta["labels"]
    assert secret["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    key = km.session.key.decode()
    assert key not in json.dumps(pod) and key not in json.dumps(secret), "the key is shown"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[m.SECRET_VOLUME]["secret"]["secretName"] == runner.secret_name


async def test_pool_fills_a_start_claims_one_and_it_refills(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    pools: KernelPools,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = kube.config(pool_size=2)
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(name="pooled"))
    pool = await filled(km, 2)
    warm = await warm_pods(kube_api, kube)
    assert len(warm) == 2
    rows = await new_provisioner(km).list_kernels()
    listed = {r["pod"].split("/")[1]: r for r in rows if r["pod"].split("/")[1] in warm}
    assert {r["state"] for r in listed.values()} == {"warm"}
    assert {r["kernel_id"] for r in listed.values()} == {
        p["metadata"]["annotations"][m.ANNOTATION_KERNEL_ID] for p in warm.values()
    }

    await km.start_kernel()
    assert "claimed" in caplog.text
    assert pod_of(km).pod_name in warm
    result = await execute(km, "print(6 * 7)")
    assert result["stdout"] == "42\n", result
    await assert_claimed_as(kube_api, kube, km)
    rows = await provisioner_of(km).list_kernels()
    (row,) = [r for r in rows if r["kernel_id"] == km.kernel_id]
    assert row["pod"] == f"{kube.namespace}/{pod_of(km).pod_name}"
    assert row["state"] == "Running"

    other = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(name="pooled"))
    await other.start_kernel()
    assert pod_of(other).pod_name in warm and pod_of(other).pod_name != pod_of(km).pod_name
    assert other.session.key != km.session.key
    assert (await execute(other, "print('other')"))["stdout"] == "other\n"
    assert (await execute(km, "print('first')"))["stdout"] == "first\n"
    key = km.session.key.decode()
    assert key not in caplog.text, "the HMAC key was logged"

    await ready_pool("pooled", 2)  # refilled
    assert pool.size == 2
    assert not set(await warm_pods(kube_api, kube)) & set(warm)
    await asyncio.gather(km.shutdown_kernel(), other.shutdown_kernel())


async def test_ten_concurrent_claims_get_ten_pods(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, pools: KernelPools
) -> None:
    pools.max_total = 10
    config = kube.config(pool_size=10)
    kms = [
        kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec(name="ten")) for _ in range(10)
    ]
    await filled(kms[0], 10, timeout=240)
    warm = await warm_pods(kube_api, kube)
    assert len(warm) == 10
    await asyncio.gather(*(km.start_kernel() for km in kms))
    await pools.drain("ten")  # no refill while the claimed kernels run
    names = {pod_of(km).pod_name for km in kms}
    assert names == set(warm)
    assert len({km.session.key for km in kms}) == 10
    results = await asyncio.gather(*(execute(km, f"print({i})") for i, km in enumerate(kms)))
    assert [r["stdout"] for r in results] == [f"{i}\n" for i in range(10)]
    for km in kms[:2]:
        await assert_claimed_as(kube_api, kube, km)
    await asyncio.gather(*(km.shutdown_kernel() for km in kms))


async def test_request_inputs_start_cold_and_leave_the_pool_alone(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    pools: KernelPools,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(pool_size=1), **kube.spec(name="cold"))
    await filled(km, 1)
    warm = await warm_pods(kube_api, kube)
    # (KERNEL_USERNAME alone would claim: a claimed kernel records its user)
    await km.start_kernel(env={"KERNEL_USERNAME": "x", "KERNEL_TEAM": "x"})
    assert "cold start, not from the pool: the request sets KERNEL_TEAM" in caplog.text
    prov = pod_of(km)
    assert not prov.fallback_for and prov.pod_name not in warm
    assert prov.pod_name.startswith("kernel-") and not prov.pod_name.startswith("kernel-pool-")
    meta = await object_meta(kube_api, kube, "pods", prov.pod_name)
    assert meta["labels"][m.LABEL_KERNEL_ID] == m.sanitize_label_value(km.kernel_id)
    assert m.LABEL_POOL not in meta["labels"]
    code = "import os; print(os.environ['KERNEL_USERNAME'])"
    assert (await execute(km, code))["stdout"] == "x\n"
    # the pooled pod is untouched, still warm and ready
    still = await warm_pods(kube_api, kube)
    assert set(still) == set(warm)
    for name, pod in still.items():
        for field in ("labels", "annotations", "uid"):
            assert pod["metadata"][field] == warm[name]["metadata"][field]
    assert len((await ready_pool("cold", 1)).ready) == 1
    await km.shutdown_kernel()
    await pools.drain()
    await no_leftovers(kube_api, kube.namespace)


async def test_restart_of_a_claimed_kernel_keeps_its_id_and_key(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, pools: KernelPools
) -> None:
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(pool_size=1), **kube.spec(name="restart")
    )
    await filled(km, 1)
    await km.start_kernel()
    claimed = pod_of(km).pod_name
    assert claimed.startswith("kernel-pool-")
    kernel_id, key = km.kernel_id, km.session.key
    assert (await execute(km, "x = 1; print('before')"))["stdout"] == "before\n"
    await km.restart_kernel()
    assert km.kernel_id == kernel_id and km.session.key == key
    runner = pod_of(km)
    assert runner.pod_name != claimed  # a new pod, in place of the claimed one
    result = await execute(km, "print('x' in dir())")
    assert result["stdout"] == "False\n", result  # a fresh kernel
    meta = await object_meta(kube_api, kube, "pods", runner.pod_name)
    assert meta["annotations"][m.ANNOTATION_KERNEL_ID] == kernel_id
    assert m.LABEL_POOL not in meta["labels"]
    await km.shutdown_kernel()


async def test_a_refused_claim_starts_cold(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    pools: KernelPools,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if kube.forbid is None:
        pytest.skip("needs the API double's forbid()")
    caplog.set_level(logging.INFO)
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(pool_size=1), **kube.spec(name="refused")
    )
    await filled(km, 1)
    (warm,) = await warm_pods(kube_api, kube)
    with kube.forbid("patch", "pods"):
        await km.start_kernel()
    assert f"cannot claim warm kernel pod {kube.namespace}/{warm}" in caplog.text
    assert "starting cold" in caplog.text
    prov = pod_of(km)
    assert not prov.fallback_for and prov.pod_name != warm
    assert (await execute(km, "print('cold')"))["stdout"] == "cold\n"
    await km.shutdown_kernel()


async def test_a_pool_filling_while_the_api_refuses_pods_backs_off_and_recovers(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    pools: KernelPools,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault in the middle of a fill: the API refuses pod creation. Each failed warm
    start is logged with its retry delay and leaves no Secret behind; once the API
    serves again, the pool fills and a start claims a kernel that runs code."""
    if kube.forbid is None:
        pytest.skip("needs the API double's forbid()")
    caplog.set_level(logging.INFO)
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(pool_size=1), **kube.spec(name="faulty")
    )
    with kube.forbid("create", "pods"):
        pools.ensure(new_provisioner(km))  # creates the pool, which starts filling
        failed = "a warm kernel failed to start; retrying in"
        await async_wait_for(lambda: failed in caplog.text, 60, "a logged warm-start failure")
        assert await leftovers(kube_api, kube.namespace) == []
        assert not await warm_pods(kube_api, kube)
    await ready_pool("faulty", 1, timeout=120)
    await km.start_kernel()
    assert pod_of(km).pod_name.startswith("kernel-pool-")
    assert (await execute(km, "print('recovered')"))["stdout"] == "recovered\n"
    await km.shutdown_kernel()


#: A "server" with a pooled kernelspec: a cold start (which creates the pool), a claimed
#: one once the pool is full, then the pool full again; it reports and waits to be killed.
SERVER = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from provisioners.lifecycle.owner import ServerIdentity
from provisioners.pool.pools import KernelPools

async def full():
    while not any(len(p.ready) >= 2 for p in KernelPools.instance().pools()):
        await asyncio.sleep(0.2)

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    cold = AsyncKernelManager(kernel_name="killed", kernel_spec_manager=ksm)
    await cold.start_kernel()
    await full()
    claimed = AsyncKernelManager(kernel_name="killed", kernel_spec_manager=ksm)
    await claimed.start_kernel()
    assert claimed.provisioner.engine.claimed_from, "not claimed"
    await full()
    print("STARTED", ServerIdentity.current(), claimed.kernel_id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_the_sweep_removes_the_pools_of_a_sigkilled_server(
    kube: Kube, kube_api: KubeClient, tmp_path: Path
) -> None:
    kernels = tmp_path / "server-kernels"
    config = kube.config(pool_size=2, sweep_on_start=False)
    write_kernelspec(kernels, "killed", KUBERNETES_PROVISIONER, config, **kube.spec())
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        str(kernels),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert server.stdout is not None
    try:
        line = (await asyncio.wait_for(server.stdout.readline(), 240)).decode()
    finally:
        server.send_signal(signal.SIGKILL)
        await server.wait()
    assert line.startswith("STARTED"), line
    _, owner, claimed_id = line.split()
    ns = kube.namespace

    def theirs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r["owner"] == owner]

    rows = theirs(await list_kernel_pods(kube_api, ns))
    assert sorted(r["state"] for r in rows) == ["Running", "Running", "warm", "warm"], rows
    (claimed,) = [r for r in rows if r["kernel_id"] == claimed_id]
    assert claimed["pod"].startswith(f"{ns}/kernel-pool-")

    swept = await sweep_orphans(kube_api, ns, logging.getLogger("test"))
    assert {r["pod"].split("/")[1] for r in rows} <= set(swept)
    selector = f"{m.KERNEL_SELECTOR},{m.LABEL_OWNER}={m.sanitize_label_value(owner)}"
    for kind in ("pods", "secrets"):
        path = f"/api/v1/namespaces/{ns}/{kind}"
        found = await kube_api.request("GET", path, query=[("labelSelector", selector)])
        left = [
            item["metadata"]["name"]
            for item in found.get("items") or []
            if not item["metadata"].get("deletionTimestamp")
        ]
        assert left == [], f"{kind} of the killed server left: {left}"

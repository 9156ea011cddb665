"""Kubernetes kernels that outlive their server (issue 21): the persist marker on pod and
Secret, detach, adoption by a fresh provisioner, and the orphan sweep's verdicts (a
persisted kernel of a dead server is marked detached and waits its adoption grace; any
other orphan goes at once).

Everything runs on the API double by default, on a real cluster with ``KUBECONFIG``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners.connection.files import PORT_NAMES, connection_file_content
from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import ProvisionerError
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeApiError, KubeClient, NotFound, resource_path
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from provisioners.k8s.sweep import kernel_verdict, mark_detached, sweep_orphans
from provisioners.lifecycle.owner import ServerIdentity, detached_mark, detached_since
from provisioners.persist import adopt_kernels
from tests.helpers import KUBERNETES_PROVISIONER, Kube, async_wait_for, execute
from tests.helpers.kube import dead_identity, get_pod, new_provisioner, pod_of

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

MakeKM = Callable[..., AsyncKernelManager]
LOG = logging.getLogger("test")
#: A server process of another machine: assumed alive (only its pod can tell).
OTHER_HOST_PROCESS = "server-7c9d-old.7.12345"


# ---------------------------------------------------------------------- manifests (no I/O)


def _spec(**extra: Any) -> m.KernelPod:
    fields: dict[str, Any] = {
        "name": "kernel-abc",
        "namespace": "jupyter",
        "image": "img",
        "command": ("python3",),
        "ports": (1, 2, 3, 4, 5),
        "kernel_id": "k-1",
        "secret_name": "kernel-abc-connection",
        "owner": "host.7.99",
        "owner_pod": "jupyter/server-1/uid-1",
    }
    fields.update(extra)
    return m.KernelPod(**fields)


def test_a_persisted_kernels_pod_is_marked_and_not_owned_by_the_server_pod() -> None:
    plain = m.pod_manifest(_spec())["metadata"]
    assert m.LABEL_PERSIST not in plain["labels"]
    assert m.ANNOTATION_ADOPTION_GRACE not in plain["annotations"]
    assert plain["ownerReferences"][0]["uid"] == "uid-1"  # collected with its server
    persisted = m.pod_manifest(_spec(persist=True, adoption_grace=90.0))["metadata"]
    assert persisted["labels"][m.LABEL_PERSIST] == "true"
    assert persisted["annotations"][m.ANNOTATION_ADOPTION_GRACE] == "90"
    assert "ownerReferences" not in persisted  # it outlives the server pod
    assert m.is_persisted(persisted) and not m.is_persisted(plain)
    warm = m.pod_manifest(_spec(persist=True, pool="pool-1"))["metadata"]
    assert not m.is_persisted(warm)  # an unclaimed warm kernel never waits for adoption
    assert m.adoption_grace_of(persisted, 5.0) == 90.0
    assert m.adoption_grace_of(plain, 5.0) == 5.0
    assert m.adoption_grace_of({"annotations": {m.ANNOTATION_ADOPTION_GRACE: "nan"}}, 5) == 5
    assert m.adoption_grace_of({"annotations": {m.ANNOTATION_ADOPTION_GRACE: "-1"}}, 5) == 5


def test_owner_patches() -> None:
    mark = detached_mark(1_800_000_000)
    assert m.owner_patch(mark, mark, drop_owner_references=True) == {
        "metadata": {
            "labels": {m.LABEL_OWNER: "detached.1800000000"},
            "annotations": {m.ANNOTATION_OWNER: mark, m.ANNOTATION_OWNER_POD: mark},
            "ownerReferences": None,
        }
    }
    # adoption outside a pod: the owner-pod annotation goes
    took = m.owner_patch("my-host.12.345")["metadata"]
    assert took["annotations"] == {
        m.ANNOTATION_OWNER: "my-host.12.345",
        m.ANNOTATION_OWNER_POD: None,
    }
    assert "ownerReferences" not in took


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
async def forget(kube: Kube, kube_api: KubeClient) -> AsyncIterator[Callable[[str], None]]:
    """forget(kernel_id): after the test, delete that kernel's pods and Secrets whoever owns
    them (a detached kernel is no longer this process's), and wait until they are gone."""
    ids: list[str] = []
    yield ids.append
    ns = kube.namespace
    left: list[str] = []
    for kind in ("pods", "secrets"):
        data = await kube_api.request(
            "GET", resource_path(kind, ns), query=[("labelSelector", m.KERNEL_SELECTOR)]
        )
        for item in data.get("items") or []:
            md = item["metadata"]
            if (md.get("annotations") or {}).get(m.ANNOTATION_KERNEL_ID) in ids:
                left.append(f"{kind}/{md['name']}")
                with contextlib.suppress(NotFound):
                    await kube_api.request(
                        "DELETE",
                        resource_path(kind, ns, md["name"]),
                        query=[("gracePeriodSeconds", "1")],
                    )
    for kernel_id in ids:
        ClusterPortCache.instance().release(f"kernel-{kernel_id}")
    for item in left:
        kind, name = item.split("/")
        await async_wait_for(
            lambda kind=kind, name=name: _gone(kube_api, ns, kind, name), 120, item, 0.5
        )


async def _gone(api: KubeClient, ns: str, kind: str, name: str) -> bool:
    try:
        await api.request("GET", resource_path(kind, ns, name), retries=0)
    except NotFound:
        return True
    return False


def persist_config(kube: Kube, **extra: Any) -> dict[str, Any]:
    return kube.config(persist_kernels=True, **extra)


def spec_name() -> str:
    """A kernelspec name of this test only: adoption looks for kernels by kernelspec."""
    return f"persist-{uuid.uuid4().hex[:8]}"


def server_stopped(km: AsyncKernelManager) -> None:
    """What the detached server's exit does: its port records go with its process."""
    ClusterPortCache.instance().release(pod_of(km).allocation_owner)


def owner_record(pod: dict[str, Any]) -> tuple[str, str, str]:
    md = pod["metadata"]
    annotations = md.get("annotations") or {}
    return (
        md["labels"].get(m.LABEL_OWNER, ""),
        annotations.get(m.ANNOTATION_OWNER, ""),
        annotations.get(m.ANNOTATION_OWNER_POD, ""),
    )


# ---------------------------------------------------------------------- detach and adopt


async def test_detach_then_adopt_from_a_fresh_provisioner(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, forget: Callable[[str], None]
) -> None:
    name = spec_name()
    km = kernel_manager(KUBERNETES_PROVISIONER, persist_config(kube), name=name, **kube.spec())
    await km.start_kernel()
    forget(km.kernel_id)
    engine = pod_of(km)
    pod_name, secret_name = engine.pod_name, engine.secret_name
    for kind, item in (("pods", pod_name), ("secrets", secret_name)):
        meta = (await kube_api.request("GET", resource_path(kind, kube.namespace, item)))[
            "metadata"
        ]
        assert meta["labels"][m.LABEL_PERSIST] == "true", kind
        assert meta["annotations"][m.ANNOTATION_ADOPTION_GRACE] == "900", kind
    result = await execute(km, "survivor = 'set before the detach'")
    assert result["status"] == "ok", result
    old_ports = list(km.ports)

    # The server stops: it detaches the kernel instead of shutting it down.
    started = time.monotonic()
    provisioner = km.provisioner
    assert isinstance(provisioner, KubernetesClusterProvisioner)
    assert await provisioner.detach() is True
    detach_seconds = time.monotonic() - started
    assert detach_seconds < 5, f"detach took {detach_seconds:.2f} s"
    assert engine.client is None, "the detached engine still holds the API client"
    assert not km.has_kernel  # the manager lets it go without a shutdown
    server_stopped(km)
    pod = await get_pod(kube_api, kube, pod_name)
    label, owner, owner_pod = owner_record(pod)
    assert detached_since(owner) is not None and owner == owner_pod == label
    assert pod["metadata"].get("deletionTimestamp") is None
    secret = await kube_api.request("GET", resource_path("secrets", kube.namespace, secret_name))
    assert detached_since(owner_record(secret)[1]) is not None
    # nothing listens on the old client address any more
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", old_ports[0])
        writer.close()

    # The next server: a template provisioner of the kernelspec finds it...
    template_km = kernel_manager(
        KUBERNETES_PROVISIONER, persist_config(kube), name=name, **kube.spec()
    )
    template = new_provisioner(template_km)
    # the chart's Role grants no 'get' on Secrets (only list): the double can check that
    denial = kube.forbid("get", "secrets") if kube.forbid is not None else None
    try:
        records = await template.adoptable_kernels()
    finally:
        if denial is not None:
            denial.lift()
    records = [r for r in records if r["kernel_id"] == km.kernel_id]
    assert len(records) == 1, records
    record = records[0]
    assert record["state"]["pod"] == pod_name
    assert record["state"]["uid"] == pod["metadata"]["uid"]
    assert record["ports"] == [int(engine.kernel_info[n]) for n in PORT_NAMES]
    key = engine.kernel_info["key"]
    assert record["kernel_info"]["key"] == (key.decode() if isinstance(key, bytes) else key)
    json.dumps(record)  # JSON-safe, as the lifecycle stores it

    # ...and a fresh manager adopts it under the same id, with the same key.
    km2 = AsyncKernelManager(kernel_name=name, kernel_spec_manager=km.kernel_spec_manager)
    km2.kernel_id = km.kernel_id
    prov2 = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, km2.kernel_spec, parent=km2
    )
    assert isinstance(prov2, KubernetesClusterProvisioner)
    await prov2.load_provisioner_info(record)
    assert prov2.has_process and await prov2.poll() is None
    km2.provisioner = prov2
    km2.load_connection_info(prov2.connection_info)
    km2.session.key = prov2.connection_info["key"]
    result = await execute(dict(prov2.connection_info), "print(survivor)")
    assert result["stdout"] == "set before the detach\n", result
    # the pod is this server's again, and no longer adoptable
    label, owner, owner_pod = owner_record(await get_pod(kube_api, kube, pod_name))
    me = str(ServerIdentity.current())
    assert owner == me and label == m.sanitize_label_value(me) and owner_pod == ""
    assert km.kernel_id not in [r["kernel_id"] for r in await template.adoptable_kernels()]
    await km2.shutdown_kernel(now=True)


async def test_detached_kernel_is_kept_within_its_grace_then_swept(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, forget: Callable[[str], None]
) -> None:
    grace = 4.0
    config = persist_config(kube, adoption_grace=grace)
    km = kernel_manager(KUBERNETES_PROVISIONER, config, name=spec_name(), **kube.spec())
    await km.start_kernel()
    forget(km.kernel_id)
    engine = pod_of(km)
    pod_name, secret_name = engine.pod_name, engine.secret_name
    provisioner = km.provisioner
    assert isinstance(provisioner, KubernetesClusterProvisioner)
    assert await provisioner.detach() is True
    server_stopped(km)
    since = detached_since(owner_record(await get_pod(kube_api, kube, pod_name))[1])
    assert since is not None
    # A sweep (without settings: the grace is read from the pod) keeps it meanwhile...
    swept = await sweep_orphans(kube_api, kube.namespace, LOG)
    assert time.time() - since < grace, "the first sweep came too late to test the grace"
    assert pod_name not in swept and secret_name not in swept
    await get_pod(kube_api, kube, pod_name)
    # ...and removes it, with its Secret, once nobody adopted it within the grace.
    await asyncio.sleep(max(0.0, since + grace + 1 - time.time()))
    swept = await sweep_orphans(kube_api, kube.namespace, LOG)
    assert pod_name in swept
    ns = kube.namespace
    assert await async_wait_for(lambda: _gone(kube_api, ns, "pods", pod_name), 120, interval=0.5)
    assert await async_wait_for(
        lambda: _gone(kube_api, ns, "secrets", secret_name), 60, interval=0.5
    )


DIES_WITH_A_PERSISTED_KERNEL = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    reply = await kc.execute_interactive("survivor = 'set before the crash'", timeout=60)
    print(km.kernel_id, reply["content"]["status"], flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def start_in_a_server_that_dies(kernels: Path, name: str, log_path: Path) -> str:
    """Start a kernel of kernelspec ``name`` (in ``kernels``) from a server process, set
    ``survivor`` in it, then SIGKILL that server (an OOM kill, a crash); its kernel id."""
    with log_path.open("wb") as log_file:  # a pipe nobody reads could fill and block it
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DIES_WITH_A_PERSISTED_KERNEL,
            str(kernels),
            name,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 150)
        assert line, log_path.read_text()[-2000:]
        kernel_id, status = line.decode().split()
        assert status == "ok", log_path.read_text()[-2000:]
        return kernel_id
    finally:
        server.send_signal(signal.SIGKILL)
        await server.wait()


async def pod_of_kernel(api: KubeClient, kube: Kube, kernel_id: str) -> dict[str, Any]:
    """The one pod of kernel ``kernel_id``."""
    pods = await api.request(
        "GET",
        resource_path("pods", kube.namespace),
        query=[("labelSelector", f"{m.KERNEL_SELECTOR},{m.LABEL_KERNEL_ID}={kernel_id}")],
    )
    (pod,) = pods["items"]
    return dict(pod)


async def test_a_dead_servers_persisted_kernel_is_marked_then_adopted(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    forget: Callable[[str], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = spec_name()
    template_km = kernel_manager(
        KUBERNETES_PROVISIONER, persist_config(kube), name=name, **kube.spec()
    )
    kernels = tmp_path / "kernels"  # where kernel_manager wrote the kernelspec
    assert (kernels / name / "kernel.json").exists()
    # a server's kernel managers find kernelspecs on the Jupyter path, not the multi-kernel
    # manager's own kernelspec manager
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    kernel_id = await start_in_a_server_that_dies(kernels, name, tmp_path / "server.log")
    forget(kernel_id)
    pod = await pod_of_kernel(kube_api, kube, kernel_id)
    pod_name = pod["metadata"]["name"]
    assert detached_since(owner_record(pod)[1]) is None  # it died: nobody marked it

    # A dead server's persisted kernel is adoptable at once...
    template = new_provisioner(template_km)
    assert kernel_id in [r["kernel_id"] for r in await template.adoptable_kernels()]
    # ...and a sweep marks it detached (its grace starts) instead of removing it.
    swept = await sweep_orphans(kube_api, kube.namespace, LOG)
    assert pod_name not in swept
    pod = await get_pod(kube_api, kube, pod_name)
    label, owner, owner_pod = owner_record(pod)
    assert detached_since(owner) is not None and label == owner == owner_pod
    records = [r for r in await template.adoptable_kernels() if r["kernel_id"] == kernel_id]
    assert len(records) == 1

    # The next server adopts it into its manager (the persist extension's path).
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
        connection_dir=str(tmp_path),
    )
    assert kernel_id in await adopt_kernels(mkm)
    try:
        adopted = mkm.get_kernel(kernel_id)
        result = await execute(adopted, "print(survivor)")
        assert result["stdout"] == "set before the crash\n", result
        assert owner_record(await get_pod(kube_api, kube, pod_name))[1] == str(
            ServerIdentity.current()
        )
    finally:
        await mkm.shutdown_kernel(kernel_id, now=True)


async def test_a_persisted_kernel_outlives_its_deleted_server_pod(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    forget: Callable[[str], None],
    tmp_path: Path,
) -> None:
    """The chart's server pod is deleted (force-deleted, evicted, its node lost) while its
    server had no time to detach: its persisted kernel pod carries no ownerReference, so
    the collector leaves it, and the next server pod adopts it."""
    ns = kube.namespace
    server_name = f"server-{uuid.uuid4().hex[:6]}"
    server = await kube_api.request(
        "POST",
        resource_path("pods", ns),
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
    server_pod = f"{ns}/{server_name}/{server['metadata']['uid']}"
    name = spec_name()
    config = persist_config(kube, server_pod=server_pod)
    kernel_manager(KUBERNETES_PROVISIONER, config, name=name, **kube.spec())
    kernel_id = await start_in_a_server_that_dies(
        tmp_path / "kernels", name, tmp_path / "server.log"
    )
    forget(kernel_id)
    pod = await pod_of_kernel(kube_api, kube, kernel_id)
    pod_name = pod["metadata"]["name"]
    assert pod["metadata"]["annotations"][m.ANNOTATION_OWNER_POD] == server_pod
    assert not pod["metadata"].get("ownerReferences")
    await kube_api.request(
        "DELETE", resource_path("pods", ns, server_name), query=[("gracePeriodSeconds", "0")]
    )
    assert await async_wait_for(lambda: _gone(kube_api, ns, "pods", server_name), 60, interval=0.5)
    await asyncio.sleep(5)  # the collector deletes an owned pod within a second or two
    pod = await get_pod(kube_api, kube, pod_name)
    assert pod["metadata"].get("deletionTimestamp") is None

    # The Deployment's next server pod (another name and uid) adopts it.
    next_pod = f"{ns}/server-{uuid.uuid4().hex[:6]}/{uuid.uuid4()}"
    config = persist_config(kube, server_pod=next_pod)
    # (the same kernelspec, as the new server pod's config has it)
    template_km = kernel_manager(KUBERNETES_PROVISIONER, config, name=name, **kube.spec())
    template = new_provisioner(template_km)
    records = [r for r in await template.adoptable_kernels() if r["kernel_id"] == kernel_id]
    assert len(records) == 1
    km2 = AsyncKernelManager(kernel_name=name, kernel_spec_manager=template_km.kernel_spec_manager)
    km2.kernel_id = kernel_id
    prov2 = KernelProvisionerFactory.instance().create_provisioner_instance(
        kernel_id, km2.kernel_spec, parent=km2
    )
    await prov2.load_provisioner_info(records[0])
    km2.provisioner = prov2
    km2.load_connection_info(prov2.connection_info)
    km2.session.key = prov2.connection_info["key"]
    try:
        result = await execute(dict(prov2.connection_info), "print(survivor)")
        assert result["stdout"] == "set before the crash\n", result
        taken = await get_pod(kube_api, kube, pod_name)
        assert taken["metadata"]["annotations"][m.ANNOTATION_OWNER_POD] == next_pod
    finally:
        await km2.shutdown_kernel(now=True)


# ---------------------------------------------------------------------- verdicts and filters


async def test_sweep_verdicts_and_what_is_adoptable(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, forget: Callable[[str], None]
) -> None:
    """Pods as servers left them (a sleeping 'kernel' container and a real Secret each):
    only a running, persisted, claimed kernel of this kernelspec and installation whose
    server is gone (or that was detached) is adoptable; the sweep marks a dead server's
    persisted kernel and removes its other orphans at once, warm ones included. A server
    pod (the chart's) that is gone counts as a dead server, whatever its process."""
    ns, name, release = kube.namespace, spec_name(), f"rel-{uuid.uuid4().hex[:6]}"
    dead, live, mark = str(dead_identity()), str(ServerIdentity.current()), detached_mark()
    tag = uuid.uuid4().hex[:6]
    gone_pod = f"{ns}/server-gone-{tag}/{uuid.uuid4()}"
    cases: dict[str, dict[str, Any]] = {
        "live": {"owner": live},  # this server's: kept, not adoptable
        # a server process elsewhere (assumed alive) in a server pod that is gone / that runs
        "pod-gone": {"owner": OTHER_HOST_PROCESS, "owner_pod": gone_pod},
        "pod-live": {"owner": OTHER_HOST_PROCESS, "owner_pod": "(the live case's pod)"},
        "dead": {"owner": dead},  # persisted, its server died: marked, adoptable
        "detached": {"owner": mark},  # detached by its server: adoptable
        "plain-dead": {"owner": dead, "persist": False},  # removed at once
        "warm-dead": {"owner": dead, "pool": f"pool-{tag}w"},  # removed at once
        "warm-detached": {"owner": mark, "pool": f"pool-{tag}x"},  # not adoptable
        "other-release": {"owner": mark, "release": f"{release}-other"},
        "no-release": {"owner": mark, "release": ""},
        "other-spec": {"owner": mark, "kernelspec": f"{name}-other"},
    }
    pods: dict[str, str] = {}
    kernel_ids: dict[str, str] = {}
    for case, fields in cases.items():
        kernel_id = f"{case}-{tag}"
        forget(kernel_id)
        kernel_ids[case] = kernel_id
        fields = {"kernelspec": name, "release": release, **fields}
        if case == "pod-live":  # a kernel pod stands in for a running server pod
            uid = (await get_pod(kube_api, kube, pods["live"]))["metadata"]["uid"]
            fields["owner_pod"] = f"{ns}/{pods['live']}/{uid}"
        pods[case] = await _fake_kernel(kube_api, kube, kernel_id, **fields)
    for pod in pods.values():
        await async_wait_for(
            lambda pod=pod: _container_runs(kube_api, ns, pod), 120, f"pod {pod} running", 0.5
        )

    template_km = kernel_manager(
        KUBERNETES_PROVISIONER, persist_config(kube, release=release), name=name, **kube.spec()
    )
    template = new_provisioner(template_km)
    ours = set(kernel_ids.values())
    found = {r["kernel_id"] for r in await template.adoptable_kernels()} & ours
    assert found == {kernel_ids["dead"], kernel_ids["detached"], kernel_ids["pod-gone"]}

    swept = set(await sweep_orphans(kube_api, ns, LOG))
    removed = {case for case, pod in pods.items() if pod in swept}
    assert removed == {"plain-dead", "warm-dead"}
    assert m.secret_name_for(pods["plain-dead"]) in swept
    for case in ("dead", "pod-gone"):
        marked = owner_record(await get_pod(kube_api, kube, pods[case]))
        assert detached_since(marked[1]) is not None and marked[0] == marked[1] == marked[2]
    assert owner_record(await get_pod(kube_api, kube, pods["live"]))[1] == live
    assert owner_record(await get_pod(kube_api, kube, pods["pod-live"]))[1] == OTHER_HOST_PROCESS
    found = {r["kernel_id"] for r in await template.adoptable_kernels()} & ours
    assert found == {kernel_ids["dead"], kernel_ids["detached"], kernel_ids["pod-gone"]}


async def test_an_adoption_is_refused_once_another_server_took_the_kernel(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, forget: Callable[[str], None]
) -> None:
    """Two servers found the same detached kernel; the other one took it over first."""
    name, kernel_id = spec_name(), f"taken-{uuid.uuid4().hex[:6]}"
    forget(kernel_id)
    pod_name = await _fake_kernel(
        kube_api, kube, kernel_id, kernelspec=name, release="", owner=detached_mark()
    )
    ns = kube.namespace
    await async_wait_for(lambda: _container_runs(kube_api, ns, pod_name), 120, interval=0.5)
    template_km = kernel_manager(
        KUBERNETES_PROVISIONER, persist_config(kube), name=name, **kube.spec()
    )
    template = new_provisioner(template_km)
    (record,) = [r for r in await template.adoptable_kernels() if r["kernel_id"] == kernel_id]
    # the other server's pod runs (the kernel's own pod stands in for it)
    uid = (await get_pod(kube_api, kube, pod_name))["metadata"]["uid"]
    taken = m.owner_patch(OTHER_HOST_PROCESS, f"{ns}/{pod_name}/{uid}")
    await kube_api.request(
        "PATCH",
        resource_path("pods", ns, pod_name),
        body=taken,
        content_type="application/merge-patch+json",
    )
    late = KernelProvisionerFactory.instance().create_provisioner_instance(
        kernel_id, template_km.kernel_spec, parent=None
    )
    with pytest.raises(ProvisionerError, match="taken over by another server"):
        await late.load_provisioner_info(record)
    assert owner_record(await get_pod(kube_api, kube, pod_name))[1] == OTHER_HOST_PROCESS
    assert kernel_id not in [r["kernel_id"] for r in await template.adoptable_kernels()]


async def test_a_sweep_never_marks_a_kernel_adopted_since_it_judged_it(
    kube: Kube, kube_api: KubeClient, forget: Callable[[str], None]
) -> None:
    """The sweep judged a dead server's persisted kernel 'mark'; before its patch, a server
    adopted the kernel: the mark (preconditioned on the judged version) is not written."""
    ns, kernel_id = kube.namespace, f"raced-{uuid.uuid4().hex[:6]}"
    forget(kernel_id)
    name = spec_name()
    pod_name = await _fake_kernel(
        kube_api, kube, kernel_id, kernelspec=name, release="", owner=str(dead_identity())
    )
    judged = await get_pod(kube_api, kube, pod_name)  # what the sweep read
    me = str(ServerIdentity.current())
    await kube_api.request(
        "PATCH",
        resource_path("pods", ns, pod_name),
        body=m.owner_patch(me),
        content_type="application/merge-patch+json",
    )

    async def judge(meta: dict[str, Any]) -> tuple[str, str]:
        return await kernel_verdict(kube_api, meta, None, {}, LOG)

    assert (await judge(judged["metadata"]))[0] == "mark"
    await mark_detached(kube_api, ns, judged, judge, LOG)
    assert owner_record(await get_pod(kube_api, kube, pod_name))[1] == me
    # judged on the current version, it is marked
    await kube_api.request(
        "PATCH",
        resource_path("pods", ns, pod_name),
        body=m.owner_patch(str(dead_identity())),
        content_type="application/merge-patch+json",
    )
    await mark_detached(kube_api, ns, await get_pod(kube_api, kube, pod_name), judge, LOG)
    assert detached_since(owner_record(await get_pod(kube_api, kube, pod_name))[1])


async def _fake_kernel(
    api: KubeClient,
    kube: Kube,
    kernel_id: str,
    *,
    kernelspec: str,
    release: str,
    owner: str,
    owner_pod: str = "",
    persist: bool = True,
    pool: str = "",
) -> str:
    """A kernel pod and Secret as a server of this package creates them, its 'kernel'
    container sleeping; returns the pod's name."""
    name = m.pod_name("persist", uuid.uuid4().hex[:12])
    secret = m.secret_name_for(name)
    ports = (21001, 21002, 21003, 21004, 21005)
    spec = m.KernelPod(
        name=name,
        namespace=kube.namespace,
        image=kube.image,
        command=("sleep", "600"),
        ports=ports,
        kernel_id=kernel_id,
        secret_name=secret,
        owner=owner,
        owner_pod=owner_pod,
        pool=pool,
        persist=persist,
        adoption_grace=900.0,
        grace_period=0,
        kernelspec=kernelspec,
        release=release,
    )
    pod = m.pod_manifest(spec)
    labels = m.kernel_labels(kernel_id, owner, pool=pool)
    persist_labels, persist_annotations = m.persist_metadata(persist, 900.0)
    labels.update(persist_labels)
    if release:
        labels[m.LABEL_RELEASE] = m.sanitize_label_value(release)
    info = {"key": uuid.uuid4().hex, "transport": "tcp", "signature_scheme": "hmac-sha256"}
    info.update(zip(PORT_NAMES, ports, strict=True))
    body = m.secret_manifest(
        secret, kube.namespace, connection_file_content(info, ip="0.0.0.0"), labels
    )
    body["metadata"]["annotations"] = {
        **m.kernel_annotations(kernel_id, owner, owner_pod=owner_pod),
        **persist_annotations,
    }
    await api.request("POST", resource_path("secrets", kube.namespace), body=body)
    await api.request("POST", resource_path("pods", kube.namespace), body=pod)
    return name


async def _container_runs(api: KubeClient, ns: str, name: str) -> bool:
    try:
        pod = await api.request("GET", resource_path("pods", ns, name))
    except KubeApiError:
        return False
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any("running" in (s.get("state") or {}) for s in statuses)


async def test_a_fresh_server_adopts_several_kernels_at_once(
    kube: Kube,
    kernel_manager: MakeKM,
    forget: Callable[[str], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adoption runs several at once on a fresh API client: each must see its pod once the
    namespace's pod list is in (a reflector another adoption has only just started knows
    no pod yet, and a kernel taken for gone would be removed)."""
    name = spec_name()
    managers = [
        kernel_manager(KUBERNETES_PROVISIONER, persist_config(kube), name=name, **kube.spec())
        for _ in range(3)
    ]
    await asyncio.gather(*(km.start_kernel() for km in managers))
    for km in managers:
        forget(km.kernel_id)
        assert (await execute(km, f"mine = {km.kernel_id!r}"))["status"] == "ok"
    for km in managers:  # the server stops: every engine lets go of the shared client
        provisioner = km.provisioner
        assert isinstance(provisioner, KubernetesClusterProvisioner)
        assert await provisioner.detach() is True
        server_stopped(km)
    kernels = tmp_path / "kernels"  # where kernel_manager wrote the kernelspec
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
        connection_dir=str(tmp_path),
    )
    ids = {km.kernel_id for km in managers}
    adopted = set(await adopt_kernels(mkm))
    try:
        assert ids <= adopted, f"not adopted: {ids - adopted}"
        for kernel_id in ids:
            result = await execute(mkm.get_kernel(kernel_id), "print(mine)")
            assert result["stdout"] == f"{kernel_id}\n", result
    finally:
        for kernel_id in adopted & ids:
            await mkm.shutdown_kernel(kernel_id, now=True)

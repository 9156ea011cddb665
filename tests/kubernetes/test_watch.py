"""The pod reflector: against the ``kube`` API (list, watch, re-watch), and its event rules."""

from __future__ import annotations

import asyncio

import pytest

from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient
from provisioners.k8s.watch import PodReflector
from provisioners.lifecycle.owner import ServerIdentity
from tests.helpers import Kube

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(60)]


def idle_pod(kube: Kube, tag: str) -> dict[str, object]:
    name = m.pod_name("watchtest", tag)
    return m.pod_manifest(
        m.KernelPod(
            name=name,
            namespace=kube.namespace,
            image=kube.image,
            command=("sleep", "60"),
            ports=(20001, 20002, 20003, 20004, 20005),
            kernel_id=f"watch-{tag}",
            secret_name=m.secret_name_for(name),
            owner=str(ServerIdentity.current()),
            grace_period=0,
        )
    )


async def test_reflector_follows_pods_across_watch_restarts(
    kube: Kube, kube_api: KubeClient
) -> None:
    reflector = PodReflector(kube_api, kube.namespace, watch_seconds=1)
    await reflector.start()
    pods = f"/api/v1/namespaces/{kube.namespace}/pods"
    name = ""
    try:
        await asyncio.sleep(1.5)  # the 1 s watch ended and was opened again
        pod = idle_pod(kube, "a")
        name = pod["metadata"]["name"]  # type: ignore[index]
        await kube_api.request("POST", pods, body=pod)
        assert await reflector.wait_for(lambda: name in reflector.pods, timeout=10)
        assert reflector.running and reflector.get(name) is not None
        await kube_api.request("DELETE", f"{pods}/{name}", query=[("gracePeriodSeconds", "0")])
        assert await reflector.wait_for(lambda: name not in reflector.pods, timeout=15)
        name = ""
    finally:
        await reflector.stop()
        if name:
            await kube_api.request("DELETE", f"{pods}/{name}", query=[("gracePeriodSeconds", "0")])


def test_watch_events_update_the_cache_and_410_means_relist() -> None:
    reflector = PodReflector(KubeClient.__new__(KubeClient), "ns")
    reflector.pods = {"old": {"metadata": {"name": "old"}}}
    added = {"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "7"}}}
    assert reflector._apply(added) is False
    assert reflector.resource_version == "7" and "p" in reflector.pods
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
    assert reflector._apply(bookmark) is False and reflector.resource_version == "9"
    deleted = {"type": "DELETED", "object": {"metadata": {"name": "old", "resourceVersion": "10"}}}
    assert reflector._apply(deleted) is False and "old" not in reflector.pods
    expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    assert reflector._apply(expired) is True

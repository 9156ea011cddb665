"""Sweeping orphans (kernel pods and Secrets whose server process is gone), and listing."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from ..exceptions import ProvisionerError
from ..owner import owner_is_gone
from . import manifests as m
from .client import KubeApiError, KubeClient

#: (kubeconfig, context, namespace) already swept for orphans by this process.
_SWEPT: set[tuple[str, str, str]] = set()
_SWEPT_LOCK = threading.Lock()


async def sweep_orphans(
    api: KubeClient | Any, namespace: str, log: logging.Logger | logging.LoggerAdapter[Any]
) -> list[str]:
    """Delete kernel pods and Secrets in ``namespace`` whose owning server is gone.

    ``api`` is a :class:`KubeClient` or a kubernetes_asyncio ``ApiClient``. Only owners
    known to have ended (server processes of this machine, see :func:`owner_is_gone`) are
    swept: a live server's kernels, and those of servers on other machines, are left
    alone. Returns the names of the deleted pods and Secrets.
    """
    client = api if isinstance(api, KubeClient) else KubeClient(api, in_cluster=False)
    base = f"/api/v1/namespaces/{namespace}"
    selector = [("labelSelector", m.KERNEL_SELECTOR)]
    deleted: list[str] = []
    pods = (await client.request("GET", f"{base}/pods", query=selector)).get("items") or []
    live_uids: set[str] = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        owner = (meta.get("annotations") or {}).get(m.ANNOTATION_OWNER, "")
        if not owner or not owner_is_gone(owner):
            live_uids.add(meta.get("uid", ""))
            continue
        name = meta["name"]
        with contextlib.suppress(KubeApiError):
            await client.request(
                "DELETE", f"{base}/pods/{name}", query=[("gracePeriodSeconds", "1")]
            )
            deleted.append(name)
            log.warning(
                "Deleted orphaned kernel pod %s/%s (owner %s is gone)", namespace, name, owner
            )
    secrets = (await client.request("GET", f"{base}/secrets", query=selector)).get("items") or []
    for secret in secrets:
        meta = secret.get("metadata") or {}
        owner = (meta.get("annotations") or {}).get(m.ANNOTATION_OWNER, "")
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owners & live_uids or not owner or not owner_is_gone(owner):
            continue
        name = meta["name"]
        with contextlib.suppress(KubeApiError):
            await client.request("DELETE", f"{base}/secrets/{name}")
            deleted.append(name)
            log.info("Deleted orphaned kernel secret %s/%s", namespace, name)
    return deleted


async def sweep_once(
    key: tuple[str, str, str],
    client: KubeClient,
    namespace: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Sweep ``namespace`` the first time this process sees ``key``; log a failure."""
    with _SWEPT_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    try:
        await sweep_orphans(client, namespace, log)
    except (KubeApiError, ProvisionerError) as exc:
        log.warning("Orphan sweep in namespace %s failed: %s", namespace, exc)


async def list_kernel_pods(client: KubeClient, namespace: str) -> list[dict[str, Any]]:
    """Our kernel pods in ``namespace``, as rows (kernel_id, target, pod, phase)."""
    pods = await client.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", m.KERNEL_SELECTOR)]
    )
    return [
        {
            "kernel_id": pod["metadata"].get("annotations", {}).get(m.ANNOTATION_KERNEL_ID, "?"),
            "target": "kubernetes",
            "pod": f"{namespace}/{pod['metadata']['name']}",
            "phase": pod.get("status", {}).get("phase", ""),
        }
        for pod in pods.get("items", [])
    ]

"""Sweeping orphans (kernel pods and Secrets whose server process is gone), and listing."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import datetime
from typing import Any

from ..exceptions import ProvisionerError
from ..hooks import kernel_row
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
    """Our kernel pods in ``namespace``, as :func:`~provisioners.base.kernel_row` rows."""
    pods = await client.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", m.KERNEL_SELECTOR)]
    )
    rows = []
    for pod in pods.get("items", []):
        meta = pod["metadata"]
        annotations = meta.get("annotations") or {}
        rows.append(
            kernel_row(
                annotations.get(m.ANNOTATION_KERNEL_ID, "?"),
                target="kubernetes",
                kernelspec=annotations.get(m.ANNOTATION_KERNELSPEC, ""),
                where=f"pod {namespace}/{meta['name']}",
                state=pod.get("status", {}).get("phase", ""),
                owner=annotations.get(m.ANNOTATION_OWNER, ""),
                created=_epoch(meta.get("creationTimestamp", "")),
                pod=f"{namespace}/{meta['name']}",
            )
        )
    return rows


def _epoch(timestamp: str) -> float:
    """RFC 3339 ``2026-12-01T02:00:00Z`` as epoch seconds (0 when absent or unparsable)."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0

"""Sweeping orphans: kernel pods and Secrets whose server process is gone."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..owner import owner_is_gone
from . import manifests as m
from .client import KubeApiError, KubeClient


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
                "DELETE", f"{base}/pods/{name}", query=[("gracePeriodSeconds", "0")]
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

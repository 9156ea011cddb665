"""Claiming a warm kernel's pod for the kernel id it now serves.

A pod's name cannot change, so a claimed warm kernel keeps its pod ``<prefix>-pool-<hex>``
and the Secret named after it (the pod's volume goes on referencing it, and the Secret
stays owned by the pod). What the claim changes, by a JSON merge patch on both, is what
``list``, ``cleanup`` and the orphan sweep read the kernel id from: the kernel-id label
(sanitized) and annotation (exact) take the real kernel id, and the pool label, which
marks an unclaimed warm kernel ('warm' in ``list``), goes. Owner, release and kernelspec
records were already this server's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..exceptions import ProvisionerError
from . import manifests as m
from .client import KubeApiError

if TYPE_CHECKING:
    from .provisioner import KubernetesClusterProvisioner

MERGE_PATCH = "application/merge-patch+json"
#: API answers worth one more try of a (idempotent) merge patch.
_TRANSIENT = frozenset({0, 429, 500, 502, 503, 504})


async def claim_pod(p: KubernetesClusterProvisioner, pool_id: str) -> None:
    """Relabel warm kernel ``pool_id``'s pod and Secret with ``p.kernel_id`` (already the
    real id); raise :class:`ProvisionerError` naming the pod when the API refuses."""
    if not p.pod_name:
        return
    if p._client is None or p._reflector is None:
        await p._attach(p._mode)
    body = m.claim_patch(p.kernel_id)
    base = f"/api/v1/namespaces/{p.namespace}"
    for kind, name in (("pods", p.pod_name), ("secrets", p.secret_name)):
        try:
            await _patch(p, f"{base}/{kind}/{name}", body)
        except KubeApiError as exc:
            what = "Forbidden (grant 'patch' on pods and secrets)" if exc.status == 403 else exc
            where = "" if kind == "pods" else f" (its Secret {name})"
            msg = (
                f"cannot claim warm kernel pod {p.namespace}/{p.pod_name}{where} "
                f"as kernel {p.kernel_id} (was {pool_id}): {what}"
            )
            raise ProvisionerError(msg, target=p.target, kernel_id=p.kernel_id) from exc
    p.log.debug(
        "Kernel %s: warm pod %s/%s relabelled (was %s)",
        p.kernel_id,
        p.namespace,
        p.pod_name,
        pool_id,
    )


async def _patch(p: KubernetesClusterProvisioner, path: str, body: dict[str, object]) -> None:
    assert p._client is not None
    try:
        await p._client.request("PATCH", path, body=body, content_type=MERGE_PATCH)
    except KubeApiError as exc:
        if exc.status not in _TRANSIENT:
            raise
        await asyncio.sleep(0.1)
        await p._client.request("PATCH", path, body=body, content_type=MERGE_PATCH)

"""Sweeping orphans (kernel pods and Secrets whose server pod or process is gone; a
persisted kernel is marked detached and removed only after its adoption grace), removing
an installation's kernels, and listing."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from ..exceptions import ProvisionerError
from ..lifecycle.engine import kernel_row
from ..lifecycle.owner import (
    DETACHED_PREFIX,
    ServerPod,
    detached_mark,
    detached_since,
    owner_is_gone,
    sweep_verdict,
)
from ..settings import SharedSettings
from . import manifests as m
from .client import Conflict, KubeApiError, KubeClient, NotFound, resource_path

MERGE_PATCH = "application/merge-patch+json"
#: The adoption grace of a kernel that recorded none, when the sweep has no settings.
_DEFAULT_GRACE = float(SharedSettings.adoption_grace.default_value)

#: (kubeconfig, context, namespace) already swept for orphans by this process.
_SWEPT: set[tuple[str, str, str]] = set()
_SWEPT_LOCK = threading.Lock()


async def sweep_orphans(
    api: KubeClient | Any,
    namespace: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
    server_pod: str = "",
    grace: float | None = None,
) -> list[str]:
    """Delete kernel pods and Secrets in ``namespace`` whose owning server is gone.

    ``api`` is a :class:`KubeClient` or a kubernetes_asyncio ``ApiClient``; ``server_pod``
    is this server's own pod (``namespace/name/uid``, '' outside a pod). A kernel whose
    owner-pod annotation names another pod is an orphan when the API says that pod no
    longer exists, has another uid (a new pod of the same name) or has ended (an evicted
    server); one started from this very pod, or without that annotation, when its server
    process is known to have ended (:func:`owner_is_gone`: a restarted container). When
    the owner cannot be checked (Forbidden, unreachable, another machine) the kernel is
    left alone: a live server's kernels never go.

    A kernel started with ``persist_kernels`` is not removed with its server: the sweep
    marks it detached (the owner record becomes :func:`detached_mark`, which makes it
    adoptable and starts its grace), and removes a detached kernel only once its adoption
    grace is over (:func:`sweep_verdict`). The grace is the one recorded on the pod at its
    start, else ``grace``, else the setting's default. Returns the deleted names.
    """
    client = api if isinstance(api, KubeClient) else KubeClient(api, in_cluster=False)
    default_grace = _DEFAULT_GRACE if grace is None else grace
    selector = [("labelSelector", m.KERNEL_SELECTOR)]
    me = ServerPod.parse(server_pod)
    checked: dict[str, bool] = {}
    deleted: list[str] = []
    path = resource_path("pods", namespace)
    pods = (await client.request("GET", path, query=selector)).get("items") or []
    kept_uids: set[str] = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        verdict, why = await kernel_verdict(client, meta, me, checked, log, default_grace)
        name = meta["name"]
        if verdict == "mark":

            async def judge(meta: dict[str, Any]) -> tuple[str, str]:
                return await kernel_verdict(client, meta, me, checked, log, default_grace)

            await mark_detached(client, namespace, pod, judge, log)
        if verdict != "remove":
            kept_uids.add(meta.get("uid", ""))
            continue
        with contextlib.suppress(KubeApiError):
            await client.request(
                "DELETE",
                resource_path("pods", namespace, name),
                query=[("gracePeriodSeconds", "1")],
            )
            deleted.append(name)
            log.warning("Deleted orphaned kernel pod %s/%s (%s)", namespace, name, why)
    path = resource_path("secrets", namespace)
    secrets = (await client.request("GET", path, query=selector)).get("items") or []
    for secret in secrets:
        meta = secret.get("metadata") or {}
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owners & kept_uids:
            continue
        verdict, _ = await kernel_verdict(client, meta, me, checked, log, default_grace)
        if verdict == "keep":
            continue  # ("mark": its pod is gone, nothing is left to adopt)
        name = meta["name"]
        with contextlib.suppress(KubeApiError):
            await client.request("DELETE", resource_path("secrets", namespace, name))
            deleted.append(name)
            log.info("Deleted orphaned kernel secret %s/%s", namespace, name)
    return deleted


async def kernel_verdict(
    client: KubeClient,
    meta: dict[str, Any],
    me: ServerPod | None,
    checked: dict[str, bool],
    log: logging.Logger | logging.LoggerAdapter[Any],
    default_grace: float = _DEFAULT_GRACE,
) -> tuple[str, str]:
    """What a sweep does with the kernel object of metadata ``meta`` (``"keep"``,
    ``"mark"`` or ``"remove"``, as :func:`sweep_verdict` says), and why."""
    persisted = m.is_persisted(meta)
    grace = m.adoption_grace_of(meta, default_grace)
    status, text, why = await owner_status(client, meta, me, checked, log)
    if status == "detached":
        verdict = sweep_verdict(text, persisted, grace)
        return (
            verdict,
            f"detached at {text.removeprefix(DETACHED_PREFIX)}, not adopted within {grace:g} s",
        )
    if status == "gone":
        return ("mark" if persisted else "remove"), why
    return "keep", ""


async def owner_status(
    client: KubeClient,
    meta: dict[str, Any],
    me: ServerPod | None,
    checked: dict[str, bool],
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> tuple[str, str, str]:
    """The owner record of the kernel object with metadata ``meta``: ``("detached", mark,
    "")`` when a detached mark, ``("gone", owner, why)`` when its server pod or process is
    known to be gone, else ``("live", owner, "")`` (alive, or cannot be told)."""
    annotations = meta.get("annotations") or {}
    process = annotations.get(m.ANNOTATION_OWNER, "")
    owner_pod = annotations.get(m.ANNOTATION_OWNER_POD, "")
    label = (meta.get("labels") or {}).get(m.LABEL_OWNER, "")
    for text in (process, owner_pod, label):
        if detached_since(text) is not None:
            return "detached", text, ""
    owner = ServerPod.parse(owner_pod)
    if owner is not None and (me is None or owner.uid != me.uid):
        key = str(owner)
        if key not in checked:
            checked[key] = await _pod_gone(client, owner, log)
        if checked[key]:
            return "gone", owner_pod, f"owner pod {owner.namespace}/{owner.name} is gone"
        return "live", owner_pod, ""
    if process and owner_is_gone(process):
        return "gone", process, f"owner {process} is gone"
    return "live", process, ""


async def mark_detached(
    client: KubeClient,
    namespace: str,
    pod: dict[str, Any],
    judge: Callable[[dict[str, Any]], Awaitable[tuple[str, str]]],
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Write a detached mark as the owner record of ``pod`` and its Secret: the kernel is
    adoptable from now on, and its adoption grace starts.

    The pod's patch holds the resourceVersion the verdict was made on: a server that
    adopted the kernel meanwhile is never overwritten. On a conflict the pod is read again
    and judged (``judge``) once more."""
    mark = detached_mark()
    name = pod["metadata"]["name"]
    path = resource_path("pods", namespace, name)
    why = ""
    for attempt in range(2):
        verdict, why = await judge(pod["metadata"])
        if verdict != "mark":
            return
        body = m.owner_patch(mark, mark, drop_owner_references=True)
        body["metadata"]["resourceVersion"] = pod["metadata"].get("resourceVersion")
        try:
            await client.request("PATCH", path, body=body, content_type=MERGE_PATCH)
            break
        except NotFound:
            return
        except Conflict:
            query = [("fieldSelector", f"metadata.name={name}")]
            found = await client.request("GET", resource_path("pods", namespace), query=query)
            items = found.get("items") or []
            if attempt or not items:
                return  # changed again: the next sweep judges it
            pod = items[0]
        except KubeApiError as exc:
            log.warning("Cannot mark kernel pod %s/%s detached: %s", namespace, name, exc)
            return
    secret = resource_path("secrets", namespace, m.secret_name_for(name))
    try:
        await client.request(
            "PATCH", secret, body=m.owner_patch(mark, mark), content_type=MERGE_PATCH
        )
    except NotFound:
        pass
    except KubeApiError as exc:
        log.warning("Cannot mark kernel secret %s detached: %s", secret, exc)
    log.warning(
        "Kernel pod %s/%s persists (%s): marked detached, adoptable for its grace",
        namespace,
        name,
        why,
    )


async def _pod_gone(
    client: KubeClient, owner: ServerPod, log: logging.Logger | logging.LoggerAdapter[Any]
) -> bool:
    """True when the API says pod ``owner`` is absent, replaced (another uid) or ended."""
    path = resource_path("pods", owner.namespace, owner.name)
    try:
        pod = await client.request("GET", path)
    except NotFound:
        return True
    except KubeApiError as exc:
        log.info("Cannot check the server pod %s (%s): its kernels are kept", owner, exc)
        return False
    if (pod.get("metadata") or {}).get("uid") != owner.uid:
        return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


async def remove_release(
    client: KubeClient,
    namespace: str,
    release: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> list[str]:
    """Delete every kernel pod and Secret of installation ``release`` in ``namespace``
    (the chart's uninstall hook); returns the deleted names."""
    label = f"{m.LABEL_RELEASE}={m.sanitize_label_value(release)}"
    selector = [("labelSelector", f"{m.KERNEL_SELECTOR},{label}")]
    deleted: list[str] = []
    for kind, query in (("pods", [("gracePeriodSeconds", "1")]), ("secrets", [])):
        path = resource_path(kind, namespace)
        items = (await client.request("GET", path, query=selector)).get("items") or []
        for item in items:
            name = item["metadata"]["name"]
            with contextlib.suppress(NotFound):
                await client.request("DELETE", resource_path(kind, namespace, name), query=query)
            deleted.append(name)
            log.info("Deleted kernel %s %s/%s of %s", kind[:-1], namespace, name, release)
    return deleted


async def sweep_once(
    key: tuple[str, str, str],
    client: KubeClient,
    namespace: str,
    log: logging.Logger | logging.LoggerAdapter[Any],
    server_pod: str = "",
    grace: float | None = None,
) -> None:
    """Sweep ``namespace`` the first time this process sees ``key``; log a failure."""
    with _SWEPT_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    try:
        await sweep_orphans(client, namespace, log, server_pod, grace)
    except (KubeApiError, ProvisionerError) as exc:
        log.warning("Orphan sweep in namespace %s failed: %s", namespace, exc)


async def list_kernel_pods(client: KubeClient, namespace: str) -> list[dict[str, Any]]:
    """Our kernel pods in ``namespace``, as :func:`~provisioners.lifecycle.base.kernel_row` rows."""
    pods = await client.request(
        "GET", resource_path("pods", namespace), query=[("labelSelector", m.KERNEL_SELECTOR)]
    )
    rows = []
    for pod in pods.get("items", []):
        meta = pod["metadata"]
        annotations = meta.get("annotations") or {}
        state = pod.get("status", {}).get("phase", "")
        if state == "Running" and m.LABEL_POOL in (meta.get("labels") or {}):
            state = "warm"  # not claimed yet
        rows.append(
            kernel_row(
                annotations.get(m.ANNOTATION_KERNEL_ID, "?"),
                target="kubernetes",
                kernelspec=annotations.get(m.ANNOTATION_KERNELSPEC, ""),
                where=f"pod {namespace}/{meta['name']}",
                state=state,
                owner=annotations.get(m.ANNOTATION_OWNER, ""),
                created=_epoch(meta.get("creationTimestamp", "")),
                pod=f"{namespace}/{meta['name']}",
                username=annotations.get(m.ANNOTATION_USERNAME, ""),
            )
        )
    return rows


def _epoch(timestamp: str) -> float:
    """RFC 3339 ``2026-12-01T02:00:00Z`` as epoch seconds (0 when absent or unparsable)."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0

"""Deletion in the double: graceful pod deletion driven by the kubelet (which takes its
time, as a real one does: ``removal_delay`` after the containers stopped, and
``stuck_pull_removal`` for a pod stuck in an image pull), finalizers, DeleteOptions
propagation, namespace deletion and the garbage collector that removes dependents (e.g.
a kernel's Secret) once their owners are gone."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
from typing import TYPE_CHECKING, Any

from .meta import JSON, ApiError, conflict, not_found, rfc3339, utcnow
from .store import Change, Store

if TYPE_CHECKING:
    from .kubelet import PodWorker

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class Deletion:
    """Deletion and garbage collection, mixed into Cluster."""

    store: Store
    workers: dict[str, PodWorker]
    #: Seconds a deleted pod stuck in an image pull stays (a v1.20 kubelet took up to 53).
    stuck_pull_removal: float = 12.0
    #: Seconds from a deleted pod's containers stopping until the object goes (the
    #: kubelet reports the final status, then confirms the deletion).
    removal_delay: float = 1.0

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        raise NotImplementedError

    def retry_pending(self) -> None:
        raise NotImplementedError

    async def delete_pod(self, ns: str, name: str, options: JSON, dry_run: bool = False) -> JSON:
        """DELETE a pod: graceful unless unscheduled, terminal or grace 0; returns the pod."""
        pod = self.store.get("pods", ns, name)
        if pod is None:
            raise not_found("pods", name)
        check_preconditions("pods", pod, options)
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        grace = max(int(grace), 0)
        if not pod["spec"].get("nodeName") or pod["status"].get("phase") in ("Succeeded", "Failed"):
            grace = 0
        if dry_run:
            return pod
        worker = self.workers.get(pod["metadata"]["uid"])
        previous = pod["metadata"].get("deletionGracePeriodSeconds")
        if pod["metadata"].get("deletionTimestamp"):
            if previous is not None and grace < previous:

                def shorten(p: JSON) -> None:
                    p["metadata"]["deletionGracePeriodSeconds"] = grace
                    p["metadata"]["deletionTimestamp"] = rfc3339(
                        utcnow() + _dt.timedelta(seconds=grace)
                    )

                pod = self.store.mutate("pods", ns, name, shorten) or pod
                if worker is not None:
                    self.spawn(worker.hasten(grace))
            return pod
        self._cascade(pod, options)

        def mark(p: JSON) -> None:
            p["metadata"]["deletionTimestamp"] = rfc3339(utcnow() + _dt.timedelta(seconds=grace))
            p["metadata"]["deletionGracePeriodSeconds"] = grace

        marked = self.store.mutate("pods", ns, name, mark)
        assert marked is not None
        if grace == 0 and not marked["metadata"].get("finalizers"):
            gone = self.store.remove("pods", ns, name)
            self.spawn(self._kill_and_clean(worker))
            return gone or marked
        self.spawn(self._terminate_then_remove(worker, ns, name, grace))
        return marked

    async def _kill_and_clean(self, worker: PodWorker | None) -> None:
        if worker is None:
            return
        await worker.terminate(0)
        await worker.cleanup()
        self.workers.pop(worker.uid, None)
        self.retry_pending()

    async def _terminate_then_remove(
        self, worker: PodWorker | None, ns: str, name: str, grace: int
    ) -> None:
        if worker is not None:
            if worker.stuck_in_pull:
                await asyncio.sleep(self.stuck_pull_removal)
            await worker.terminate(grace)
            await asyncio.gather(worker.cleanup(), asyncio.sleep(self.removal_delay))
            self.workers.pop(worker.uid, None)
        self.finalize("pods", ns, name, kubelet_done=True)
        self.retry_pending()

    def finalize(self, resource: str, ns: str, name: str, kubelet_done: bool = False) -> None:
        """Remove an object being deleted once nothing holds it any more."""
        obj = self.store.get(resource, ns, name)
        if (
            obj is None
            or not obj["metadata"].get("deletionTimestamp")
            or obj["metadata"].get("finalizers")
        ):
            return
        if resource == "pods" and not kubelet_done and obj["metadata"]["uid"] in self.workers:
            return
        self.store.remove(resource, ns, name)

    def _cascade(self, owner: JSON, options: JSON) -> None:
        """Apply a DeleteOptions propagationPolicy to the dependents of ``owner``."""
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background"
        )
        uid = owner["metadata"]["uid"]
        for (res, ns, name), obj in list(self.store.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == uid for r in refs):
                continue
            if policy == "Orphan":

                def orphan(o: JSON, refs: list[JSON] = refs) -> None:
                    o["metadata"]["ownerReferences"] = [
                        r for r in refs if r.get("uid") != uid
                    ] or None
                    if o["metadata"]["ownerReferences"] is None:
                        del o["metadata"]["ownerReferences"]

                self.store.mutate(res, ns, name, orphan)
            elif policy == "Foreground":
                self.spawn(self.delete_object(res, ns, name, {}))

    async def delete_object(
        self, resource: str, ns: str, name: str, options: JSON, dry_run: bool = False
    ) -> JSON:
        """DELETE anything: pods and namespaces have their own flows; others go at once
        (or wait for their finalizers). Returns the object as last stored."""
        if resource == "pods":
            return await self.delete_pod(ns, name, options, dry_run)
        if resource == "namespaces":
            return self.delete_namespace(name, dry_run)
        obj = self.store.get(resource, ns, name)
        if obj is None:
            raise not_found(resource, name)
        check_preconditions(resource, obj, options)
        if dry_run:
            return obj
        self._cascade(obj, options)
        if obj["metadata"].get("finalizers"):
            return (
                self.store.mutate(
                    resource,
                    ns,
                    name,
                    lambda o: o["metadata"].setdefault("deletionTimestamp", rfc3339()),
                )
                or obj
            )
        return self.store.remove(resource, ns, name) or obj

    def delete_namespace(self, name: str, dry_run: bool = False) -> JSON:
        ns_obj = self.store.get("namespaces", "", name)
        if ns_obj is None:
            raise not_found("namespaces", name)
        if name in SYSTEM_NAMESPACES:
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                {"name": name, "kind": "namespaces"},
            )
        if dry_run or ns_obj["metadata"].get("deletionTimestamp"):
            return ns_obj

        def terminating(o: JSON) -> None:
            o["metadata"]["deletionTimestamp"] = rfc3339()
            o["status"]["phase"] = "Terminating"

        marked = self.store.mutate("namespaces", "", name, terminating)
        self.spawn(self._empty_namespace(name))
        return marked or ns_obj

    async def _empty_namespace(self, name: str) -> None:
        for pod in self.store.list("pods", name):
            with contextlib.suppress(ApiError):
                await self.delete_pod(name, pod["metadata"]["name"], {})
        while self.store.list("pods", name):
            await self.store.wait_change("pods", name, 0.5)
        for resource in ("secrets", "configmaps", "events", "persistentvolumeclaims"):
            for obj in self.store.list(resource, name):
                self.store.remove(resource, name, obj["metadata"]["name"])
        self.store.remove("namespaces", "", name)

    # -- garbage collection -------------------------------------------------------------------
    def _on_change(self, change: Change) -> None:
        if change.kind == "DELETED":
            uid = change.obj["metadata"].get("uid")
            asyncio.get_running_loop().call_later(0.3, self._collect, uid)
        elif change.kind == "ADDED" and change.obj["metadata"].get("ownerReferences"):
            md = change.obj["metadata"]
            asyncio.get_running_loop().call_later(
                0.5,
                self._verify_owners,
                change.resource,
                md.get("namespace", ""),
                md["name"],
                md["uid"],
            )

    def _owner_exists(self, uid: str, namespace: str = "") -> bool:
        """Whether owner ``uid`` exists where a dependent in ``namespace`` may have it: a
        namespaced owner in another namespace counts as absent (as for the real collector)."""
        found = self.store.find_uid(uid)
        if found is None:
            return False
        owner_ns = found[1]["metadata"].get("namespace", "")
        return not (namespace and owner_ns and owner_ns != namespace)

    def _collect(self, owner_uid: str) -> None:
        """Delete dependents whose owners are all gone; drop the dangling reference otherwise."""
        for (res, ns, name), obj in list(self.store.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == owner_uid for r in refs):
                continue
            alive = [
                r
                for r in refs
                if r.get("uid") != owner_uid and self._owner_exists(r.get("uid", ""), ns)
            ]
            if alive:
                self.store.mutate(
                    res,
                    ns,
                    name,
                    lambda o, keep=alive: o["metadata"].__setitem__("ownerReferences", keep),
                )
            elif not obj["metadata"].get("deletionTimestamp"):
                self.spawn(self._gc_delete(res, ns, name))

    def _verify_owners(self, resource: str, ns: str, name: str, uid: str) -> None:
        obj = self.store.get(resource, ns, name)
        if obj is None or obj["metadata"]["uid"] != uid:
            return
        refs = obj["metadata"].get("ownerReferences") or []
        if refs and not any(self._owner_exists(r.get("uid", ""), ns) for r in refs):
            self.spawn(self._gc_delete(resource, ns, name))

    async def _gc_delete(self, resource: str, ns: str, name: str) -> None:
        with contextlib.suppress(ApiError):
            await self.delete_object(resource, ns, name, {"propagationPolicy": "Background"})


def check_preconditions(resource: str, obj: JSON, options: JSON) -> None:
    pre = options.get("preconditions") or {}
    md = obj["metadata"]
    if pre.get("uid") and pre["uid"] != md.get("uid"):
        raise conflict(
            resource,
            md["name"],
            f"Precondition failed: UID in precondition: {pre['uid']}, "
            f"UID in object meta: {md.get('uid')}",
        )
    if pre.get("resourceVersion") and pre["resourceVersion"] != md.get("resourceVersion"):
        raise conflict(
            resource,
            md["name"],
            f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
            f"ResourceVersion in object meta: {md.get('resourceVersion')}",
        )

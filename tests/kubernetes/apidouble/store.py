"""The double's etcd: objects by (resource, namespace, name), one global increasing
resourceVersion, an event history for watches that resume from a resourceVersion, and
live subscriptions. Runs on the double's event loop only (no locking)."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .meta import JSON, ApiError, rfc3339


@dataclass(frozen=True)
class Resource:
    """A served resource: its plural name, kind, scope and selectable fields."""

    name: str
    kind: str
    namespaced: bool
    fields: Callable[[JSON], dict[str, str]]
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )
    short_names: tuple[str, ...] = ()


def _meta_fields(obj: JSON) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    out = {"metadata.name": meta.get("name", "")}
    if "namespace" in meta or not obj:
        out["metadata.namespace"] = meta.get("namespace", "")
    return out


def _pod_fields(obj: JSON) -> dict[str, str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    meta = obj.get("metadata") or {}
    return {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.restartPolicy": spec.get("restartPolicy", ""),
        "spec.schedulerName": spec.get("schedulerName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
        "status.phase": status.get("phase", ""),
        "status.podIP": status.get("podIP", ""),
        "status.nominatedNodeName": status.get("nominatedNodeName", ""),
    }


def _secret_fields(obj: JSON) -> dict[str, str]:
    return {**_meta_fields({"metadata": {"namespace": ""}, **obj}), "type": obj.get("type", "")}


def _event_fields(obj: JSON) -> dict[str, str]:
    inv = obj.get("involvedObject") or {}
    out = _meta_fields({"metadata": {"namespace": ""}, **obj})
    for key in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"):
        out[f"involvedObject.{key}"] = inv.get(key, "")
    out["reason"] = obj.get("reason", "")
    out["reportingComponent"] = obj.get("reportingComponent", "")
    out["source"] = (obj.get("source") or {}).get("component", "")
    out["type"] = obj.get("type", "")
    return out


def _namespace_fields(obj: JSON) -> dict[str, str]:
    return {
        "metadata.name": (obj.get("metadata") or {}).get("name", ""),
        "status.phase": (obj.get("status") or {}).get("phase", ""),
    }


def _node_fields(obj: JSON) -> dict[str, str]:
    return {
        "metadata.name": (obj.get("metadata") or {}).get("name", ""),
        "spec.unschedulable": "true" if (obj.get("spec") or {}).get("unschedulable") else "false",
    }


RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource("pods", "Pod", True, _pod_fields, short_names=("po",)),
        Resource("secrets", "Secret", True, _secret_fields),
        Resource(
            "configmaps",
            "ConfigMap",
            True,
            lambda o: _meta_fields({"metadata": {"namespace": ""}, **o}),
            short_names=("cm",),
        ),
        Resource("events", "Event", True, _event_fields, short_names=("ev",)),
        Resource(
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            True,
            lambda o: _meta_fields({"metadata": {"namespace": ""}, **o}),
            short_names=("pvc",),
        ),
        Resource(
            "namespaces",
            "Namespace",
            False,
            _namespace_fields,
            verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
            short_names=("ns",),
        ),
        Resource(
            "nodes",
            "Node",
            False,
            _node_fields,
            verbs=("get", "list", "watch"),
            short_names=("no",),
        ),
    )
}

Key = tuple[str, str, str]


@dataclass
class Change:
    """One stored change: ``kind`` ADDED/MODIFIED/DELETED, the new and previous objects."""

    rv: int
    resource: str
    namespace: str
    kind: str
    obj: JSON
    prev: JSON | None


@dataclass(eq=False)
class Subscription:
    """A live watch: changes of one resource (optionally one namespace) queue up here."""

    resource: str
    namespace: str | None
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)


class Store:
    """Objects plus history; every write bumps the global resourceVersion."""

    def __init__(self, history: int = 20000) -> None:
        self.objects: dict[Key, JSON] = {}
        self.rv = 0
        self.history: deque[Change] = deque(maxlen=history)
        self.compacted_rv = 0
        self.subscriptions: set[Subscription] = set()
        self._waiters: list[tuple[str, str | None, asyncio.Future[None]]] = []
        self.listeners: list[Callable[[Change], None]] = []

    # -- reads ---------------------------------------------------------------------------
    def get(self, resource: str, namespace: str, name: str) -> JSON | None:
        return self.objects.get((resource, namespace, name))

    def list(self, resource: str, namespace: str | None = None) -> list[JSON]:
        return [
            obj
            for (res, ns, _), obj in sorted(self.objects.items())
            if res == resource and (namespace is None or ns == namespace)
        ]

    def find_uid(self, uid: str) -> tuple[Key, JSON] | None:
        for key, obj in self.objects.items():
            if obj["metadata"].get("uid") == uid:
                return key, obj
        return None

    # -- writes --------------------------------------------------------------------------
    def create(self, resource: str, obj: JSON) -> JSON:
        meta = obj["metadata"]
        key = (resource, meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists')
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", rfc3339())
        return self._commit(resource, key, obj, "ADDED", None)

    def update(self, resource: str, obj: JSON) -> JSON:
        meta = obj["metadata"]
        key = (resource, meta.get("namespace", ""), meta["name"])
        prev = self.objects.get(key)
        if prev is None:
            raise ApiError(404, "NotFound", f'{resource} "{meta["name"]}" not found')
        return self._commit(resource, key, obj, "MODIFIED", prev)

    def mutate(
        self, resource: str, namespace: str, name: str, fn: Callable[[JSON], Any]
    ) -> JSON | None:
        """Apply ``fn`` to a copy of the object and store it when it changed; None if gone."""
        current = self.get(resource, namespace, name)
        if current is None:
            return None
        new = copy.deepcopy(current)
        fn(new)
        if new == current:
            return current
        return self.update(resource, new)

    def remove(self, resource: str, namespace: str, name: str) -> JSON | None:
        key = (resource, namespace, name)
        prev = self.objects.pop(key, None)
        if prev is None:
            return None
        obj = copy.deepcopy(prev)
        return self._commit(resource, key, obj, "DELETED", prev, store=False)

    def _commit(
        self, resource: str, key: Key, obj: JSON, kind: str, prev: JSON | None, store: bool = True
    ) -> JSON:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if store:
            self.objects[key] = obj
        change = Change(self.rv, resource, key[1], kind, obj, prev)
        self.history.append(change)
        for sub in list(self.subscriptions):
            if sub.resource == resource and sub.namespace in (None, key[1]):
                sub.queue.put_nowait(change)
        for waiter in list(self._waiters):
            res, ns, fut = waiter
            if res == resource and ns in (None, key[1]) and not fut.done():
                fut.set_result(None)
        self._waiters = [w for w in self._waiters if not w[2].done()]
        for listener in list(self.listeners):
            listener(change)
        return obj

    # -- watches -------------------------------------------------------------------------
    def subscribe(
        self, resource: str, namespace: str | None, since: int | None
    ) -> tuple[list[Change], Subscription]:
        """Changes after ``since`` (None: none) and a live subscription from now on;
        410 Expired when ``since`` precedes the retained history."""
        backlog: list[Change] = []
        if since is not None:
            oldest = self.history[0].rv if self.history else self.rv + 1
            if since < self.compacted_rv or (since + 1 < oldest and since < self.rv):
                raise ApiError(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({max(oldest - 1, self.compacted_rv)})",
                )
            backlog = [
                c
                for c in self.history
                if c.rv > since and c.resource == resource and namespace in (None, c.namespace)
            ]
        sub = Subscription(resource, namespace)
        self.subscriptions.add(sub)
        return backlog, sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def close_subscriptions(self) -> None:
        for sub in list(self.subscriptions):
            sub.queue.put_nowait(None)
        self.subscriptions.clear()

    def compact(self) -> None:
        """Forget the history, like an etcd compaction: older resourceVersions get 410."""
        self.history.clear()
        self.compacted_rv = self.rv

    async def wait_change(
        self, resources: str | tuple[str, ...], namespace: str | None, timeout: float
    ) -> None:
        """Return after the next change to one of ``resources`` (in ``namespace``), or
        after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        for resource in (resources,) if isinstance(resources, str) else resources:
            self._waiters.append((resource, namespace, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if not fut.done():
                fut.cancel()
            self._waiters = [w for w in self._waiters if w[2] is not fut]

"""Watching kernel pods: a shared reflector per namespace, and reading a pod's status.

:class:`PodReflector` lists our kernel pods of a namespace, then watches them from the
list's resourceVersion, restarting the watch periodically and relisting when the server
says the version is gone (410), with a bounded backoff on failures. ``poll()`` and the
start-up wait read its cache instead of calling the API.

The pure functions at the bottom interpret a pod dict: is the kernel running, has it
exited (with which code), and why a start fails (image pulls, scheduling, crashes) in
the cluster's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..connection.ports import PortSource
from .client import Forbidden, Gone, KubeApiError, KubeClient, Unauthorized, resource_path
from .loop import EngineLoop
from .manifests import INIT_CONTAINER, KERNEL_CONTAINER, KERNEL_SELECTOR, ports_held_on_node

#: Waiting reasons that will not fix themselves: the start fails at once.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

log = logging.getLogger(__name__)


class PodReflector:
    """A local, watch-fed copy of the kernel pods of one namespace."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        selector: str = KERNEL_SELECTOR,
        watch_seconds: int = 300,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.selector = selector
        self.watch_seconds = watch_seconds
        self.max_backoff = max_backoff
        self.pods: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        #: How many times the pods were listed (1 + relists after expired versions/errors).
        self.lists = 0
        self.error: Exception | None = None
        self._changed = asyncio.Condition()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        return resource_path("pods", self.namespace)

    async def start(self, timeout: float = 10.0) -> None:
        """Start watching and wait for the first list; raise its error if it fails."""
        if self._task is None or self._task.done():
            self._loaded.clear()
            self.error = None
            self._task = asyncio.create_task(self._run(), name=f"pod-reflector-{self.namespace}")
        loaded = asyncio.create_task(self._loaded.wait())
        try:
            await asyncio.wait({loaded, self._task}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            loaded.cancel()
        if not self._loaded.is_set():
            error = self.error
            await self.stop()
            if error is not None:
                raise error
            raise KubeApiError(0, "Timeout", f"listing pods of {self.namespace}: no answer")

    async def stop(self) -> None:
        """Stop watching."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def loaded(self) -> bool:
        """True once the first list is in: before it, :meth:`get` knows no pod."""
        return self.running and self._loaded.is_set()

    def get(self, name: str) -> dict[str, Any] | None:
        """The cached pod ``name``, or None when it does not exist (as far as we know)."""
        return self.pods.get(name)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds after some change; False on timeout."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _list(self) -> None:
        data = await self.client.request("GET", self.path, query=[("labelSelector", self.selector)])
        self.lists += 1
        self.pods = {p["metadata"]["name"]: p for p in data.get("items") or []}
        self.resource_version = (data.get("metadata") or {}).get("resourceVersion", "")

    async def _run(self) -> None:
        delay = 0.5
        relist = True
        while True:
            try:
                if relist:
                    await self._list()
                    relist = False
                    self._loaded.set()
                    await self._notify()
                query = [
                    ("labelSelector", self.selector),
                    ("resourceVersion", self.resource_version),
                    ("allowWatchBookmarks", "true"),
                ]
                async for event in self.client.watch(self.path, query, self.watch_seconds):
                    relist = self._apply(event)
                    await self._notify()
                    if relist:
                        break
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = exc
                if isinstance(exc, Gone):
                    relist = True
                    continue
                if not self._loaded.is_set():
                    return  # the first list failed (after its retries): start() reports it
                log.warning(
                    "Pod watch in namespace %s failed (%s); retrying in %.1f s",
                    self.namespace,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                relist = True

    def _apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one watch event; True when a relist is needed."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                return True
            raise KubeApiError(int(code or 0), str(obj.get("reason", "")), str(obj.get("message")))
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        name = meta.get("name")
        if kind == "BOOKMARK" or not name:
            return False
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = dict(obj)
        return False


async def pod_events(
    client: KubeClient, namespace: str, pod: str, timeout_seconds: int = 300
) -> AsyncIterator[dict[str, Any]]:
    """Yield the events about pod ``pod`` (existing ones first), until cancelled."""
    path = resource_path("events", namespace)
    selector = f"involvedObject.kind=Pod,involvedObject.name={pod}"
    seen: set[str] = set()
    delay = 0.5
    while True:
        try:
            async for event in client.watch(path, [("fieldSelector", selector)], timeout_seconds):
                obj = event.get("object") or {}
                if event.get("type") not in ("ADDED", "MODIFIED"):
                    continue
                if (obj.get("involvedObject") or {}).get("name") != pod:
                    continue
                key = f"{obj.get('reason')}/{obj.get('message')}"  # repeats only bump count
                if key in seen:
                    continue
                seen.add(key)
                yield obj
            delay = 0.5
        except asyncio.CancelledError:
            raise
        except (Unauthorized, Forbidden) as exc:
            log.debug("Cannot watch events of pod %s: %s", pod, exc)
            return
        except KubeApiError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


# ---------------------------------------------------------------------- reading a pod


def _statuses(pod: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return list((pod.get("status") or {}).get(key) or [])


def container_status(pod: Mapping[str, Any], name: str = KERNEL_CONTAINER) -> dict[str, Any]:
    """The status of container ``name`` (init or not), or {} when not reported yet."""
    for key in ("containerStatuses", "initContainerStatuses"):
        for status in _statuses(pod, key):
            if status.get("name") == name:
                return dict(status)
    return {}


def kernel_running(pod: Mapping[str, Any]) -> bool:
    """True when the kernel container runs."""
    return "running" in (container_status(pod).get("state") or {})


def kernel_exit_code(pod: Mapping[str, Any] | None) -> int | None:
    """None while the kernel may still run; its exit code once it has ended.

    A missing pod counts as ended (code 1, or 0 when it was deleted after a clean exit).
    """
    if pod is None:
        return 1
    state = container_status(pod).get("state") or {}
    if "terminated" in state:
        return int(state["terminated"].get("exitCode", 1))
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Succeeded":
        return 0
    if phase == "Failed":
        return 1
    return None


@dataclass(frozen=True)
class StartProblem:
    """Why a kernel pod cannot start: a reason and the cluster's message."""

    reason: str
    message: str
    container: str = ""
    wants_logs: bool = False
    #: The container's exit code when it exited (None while it never ran or still waits).
    exit_code: int | None = None

    def __str__(self) -> str:
        where = f"container {self.container!r}: " if self.container else ""
        return f"{where}{self.reason}: {self.message}" if self.message else where + self.reason


#: The scheduler's words for a pod waiting for its claims to be bound.
_UNBOUND_CLAIMS = "unbound immediate PersistentVolumeClaims"


def start_problem(
    pod: Mapping[str, Any], *, unschedulable_fails: bool = True
) -> StartProblem | None:
    """The reason ``pod`` will not become a running kernel, or None while it still may."""
    status = pod.get("status") or {}
    if unschedulable_fails:
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
                # a claim not bound yet (the volume controller or a provisioner is at it,
                # e.g. a user's claim created just before the pod) is not a lost cause
                and _UNBOUND_CLAIMS not in str(cond.get("message", ""))
            ):
                return StartProblem("Unschedulable", str(cond.get("message", "")))
    for key in ("initContainerStatuses", "containerStatuses"):
        for cstatus in status.get(key) or []:
            name = str(cstatus.get("name", ""))
            state = cstatus.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING:
                crash = waiting["reason"] == "CrashLoopBackOff"
                return StartProblem(
                    waiting["reason"], str(waiting.get("message", "")), name, wants_logs=crash
                )
            done = state.get("terminated")
            if done is None:
                continue
            code = int(done.get("exitCode", 1))
            if code == 0 and (name == INIT_CONTAINER or key == "initContainerStatuses"):
                continue
            reason = str(done.get("reason") or "Terminated")
            message = f"exited with code {code}"
            if done.get("message"):
                message += f": {done['message']}"
            return StartProblem(reason, message, name, wants_logs=True, exit_code=code)
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        return StartProblem(f"Pod{phase}", str(status.get("message") or status.get("reason") or ""))
    return None


def describe_progress(pod: Mapping[str, Any]) -> str:
    """A short account of where a pending pod is (for logs and timeout messages)."""
    status = pod.get("status") or {}
    parts = [f"phase {status.get('phase', 'Pending')}"]
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        parts.append(f"node {node}")
    for key in ("initContainerStatuses", "containerStatuses"):
        for cstatus in status.get(key) or []:
            state = cstatus.get("state") or {}
            for name, detail in state.items():
                reason = (detail or {}).get("reason", "")
                parts.append(f"{cstatus.get('name')} {name}{' (' + reason + ')' if reason else ''}")
    for cond in status.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("message"):
            parts.append(f"{cond.get('type')}: {cond['message']}")
    return ", ".join(parts)


def owned_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods carrying our managed-by and component labels."""
    out = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if all(
            labels.get(k) == v
            for k, v in (part.split("=", 1) for part in KERNEL_SELECTOR.split(","))
        ):
            out.append(pod)
    return out


class HeldPorts(PortSource):
    """The ports our hostNetwork pods hold, read from the reflector's cache."""

    def __init__(self, engine: EngineLoop, reflector: PodReflector, node: str | None) -> None:
        self.engine = engine
        self.reflector = reflector
        self.node = node

    def ports_in_use(self, host: str) -> set[int]:
        # the cache changes on the engine loop: read it there
        pods = self.engine.call(lambda: list(self.reflector.pods.values()))
        return ports_held_on_node(pods, self.node)

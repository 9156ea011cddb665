"""The double's control plane: one fake node, the scheduler, the event recorder, the
garbage collector, pod and namespace deletion, and the RBAC deny rules. Everything here
runs on the double's event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import podspec
from .deletion import SYSTEM_NAMESPACES, Deletion
from .kubelet import PodWorker
from .meta import JSON, ApiError, micro_time, rfc3339
from .runtime import DockerRuntime
from .store import Store

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DenyRule:
    """An RBAC denial: ``verb`` on ``resource`` (``*`` matches any), in one namespace or all.

    ``times`` limits it to that many refusals (then it lifts itself); ``code`` other than
    403 answers as a failing API server (e.g. 500 InternalError, 503 ServiceUnavailable).
    """

    verb: str
    resource: str
    namespace: str | None = None
    times: int | None = None
    code: int = 403

    def matches(self, verb: str, resource: str, namespace: str | None) -> bool:
        return (
            self.verb in ("*", verb)
            and self.resource in ("*", resource)
            and self.namespace in (None, namespace)
        )


@dataclass
class ApiRequest:
    """One served API request, for tests that check how a client used the API."""

    verb: str
    resource: str
    namespace: str | None
    name: str | None
    code: int


class Cluster(Deletion):
    """State shared by the routes, the kubelet and the stream handlers."""

    def __init__(
        self,
        instance: str,
        helper_image: str,
        workdir: Path,
        user: str,
        node_name: str,
        node_labels: dict[str, str],
        node_resources: dict[str, str],
        backoff: tuple[float, float],
    ) -> None:
        self.instance = instance
        self.workdir = workdir
        self.user = user
        self.node_name = node_name
        self.backoff = backoff
        self.store = Store()
        self.runtime = DockerRuntime(instance, helper_image)
        self.workers: dict[str, PodWorker] = {}
        self.deny: list[DenyRule] = []
        self.requests: list[ApiRequest] = []
        #: Every (verb, resource, namespace) the authorizer checked, allowed or not.
        self.authorizations: list[tuple[str, str, str | None]] = []
        self.node_ip = "127.0.0.1"
        self.tasks: set[asyncio.Task[Any]] = set()
        self._node_labels = node_labels
        self._node_resources = node_resources
        self.store.listeners.append(self._on_change)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.runtime.start_events(asyncio.get_running_loop())
        stale = await self.runtime.call(None, self.runtime.sweep_orphans)
        if stale:
            log.warning("k8s double: removed %d objects of dead test runs", len(stale))
        self.node_ip = await self.runtime.call(None, _bridge_gateway, self.runtime)
        for name in SYSTEM_NAMESPACES:
            self.store.create("namespaces", namespace_object(name))
        self.store.create("nodes", self._node_object())

    async def stop(self) -> None:
        self.store.close_subscriptions()
        for worker in list(self.workers.values()):
            if worker.task is not None:
                worker.task.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.sleep(0)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, kept until done (teardown waits for these)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("k8s double background task failed", exc_info=task.exception())

    # -- node -------------------------------------------------------------------------------
    def _node_object(self) -> JSON:
        machine = platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
        memory_kib = _memory_kib()
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{memory_kib}Ki",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            **self._node_resources,
        }
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": arch,
            **self._node_labels,
        }
        now = rfc3339()
        conditions = [
            {
                "type": t,
                "status": "False",
                "reason": r,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for t, r in (
                ("MemoryPressure", "KubeletHasSufficientMemory"),
                ("DiskPressure", "KubeletHasNoDiskPressure"),
                ("PIDPressure", "KubeletHasSufficientPID"),
            )
        ] + [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ]
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {"name": self.node_name, "labels": labels, "annotations": {}},
            "spec": {},
            "status": {
                "capacity": capacity,
                "allocatable": dict(capacity),
                "conditions": conditions,
                "addresses": [
                    {"type": "InternalIP", "address": self.node_ip},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "kubeletVersion": "v1.31.0-k8s-double",
                    "kubeProxyVersion": "v1.31.0-k8s-double",
                    "containerRuntimeVersion": "docker://double",
                    "operatingSystem": "linux",
                    "architecture": arch,
                    "kernelVersion": platform.release(),
                    "osImage": "k8s double on docker",
                    "machineID": self.instance,
                    "systemUUID": self.instance,
                    "bootID": self.instance,
                },
            },
        }

    def update_node(self, labels: dict[str, str] | None, resources: dict[str, str] | None) -> None:
        """Change the fake node's labels/extended resources, then retry pending pods."""
        if labels is not None:
            self._node_labels = labels
        if resources is not None:
            self._node_resources = resources
        node = self._node_object()
        current = self.store.get("nodes", "", self.node_name)
        if current is not None:
            node["metadata"]["uid"] = current["metadata"]["uid"]
            node["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
            self.store.update("nodes", node)
        self.retry_pending()

    # -- events -------------------------------------------------------------------------------
    def record_event(
        self,
        obj: JSON,
        reason: str,
        message: str,
        kind: str = "Normal",
        field_path: str | None = None,
        component: str = "kubelet",
    ) -> None:
        """Record a core/v1 Event about ``obj``; repeats bump ``count`` like the recorder."""
        md = obj["metadata"]
        ns = md.get("namespace") or "default"
        for event in self.store.list("events", ns):
            inv = event["involvedObject"]
            if (
                inv.get("uid") == md.get("uid")
                and event["reason"] == reason
                and event["message"] == message
                and inv.get("fieldPath") == field_path
                and event.get("reportingComponent") == component
            ):

                def bump(e: JSON) -> None:
                    e["count"] = e.get("count", 1) + 1
                    e["lastTimestamp"] = rfc3339()
                    if e.get("series"):
                        e["series"]["count"] += 1

                self.store.mutate("events", ns, event["metadata"]["name"], bump)
                return
        involved: JSON = {
            "kind": obj.get("kind", "Pod"),
            "namespace": md.get("namespace", ""),
            "name": md["name"],
            "uid": md.get("uid", ""),
            "apiVersion": "v1",
            "resourceVersion": md.get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        now = rfc3339()
        event: JSON = {
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": {"name": f"{md['name']}.{time.time_ns():x}", "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": kind,
            "reportingComponent": component,
            "reportingInstance": self.node_name
            if component == "kubelet"
            else f"{component}-{self.node_name}",
        }
        if component == "kubelet":
            event.update(
                source={"component": "kubelet", "host": self.node_name},
                firstTimestamp=now,
                lastTimestamp=now,
                count=1,
                eventTime=None,
            )
        else:  # the scheduler records through events.k8s.io: eventTime, no timestamps
            event.update(
                source={},
                firstTimestamp=None,
                lastTimestamp=None,
                eventTime=micro_time(),
                action="Scheduling" if kind == "Warning" else "Binding",
            )
        self.store.create("events", event)

    # -- scheduling ---------------------------------------------------------------------------
    def pod_created(self, pod: JSON) -> None:
        asyncio.get_running_loop().call_soon(
            self.schedule,
            pod["metadata"]["namespace"],
            pod["metadata"]["name"],
            pod["metadata"]["uid"],
        )

    def schedule(self, ns: str, name: str, uid: str) -> None:
        pod = self.store.get("pods", ns, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
            return
        if pod["spec"].get("nodeName"):  # bound by the client: no scheduler involved
            if pod["spec"]["nodeName"] == self.node_name and uid not in self.workers:
                self._start_worker(self.store.mutate("pods", ns, name, _scheduled) or pod)
            return
        node = self.store.get("nodes", "", self.node_name)
        assert node is not None
        others = [
            p
            for p in self.store.list("pods")
            if p["spec"].get("nodeName") == self.node_name
            and p["status"].get("phase") not in ("Succeeded", "Failed")
        ]
        reason = podspec.unschedulable_reason(pod, node, others)
        if reason:

            def unschedulable(p: JSON) -> None:
                conds = [
                    c for c in p["status"].get("conditions") or [] if c["type"] != "PodScheduled"
                ]
                old = next(
                    (c for c in p["status"].get("conditions") or [] if c["type"] == "PodScheduled"),
                    {},
                )
                since = old.get("lastTransitionTime") if old.get("status") == "False" else rfc3339()
                p["status"]["conditions"] = [
                    *conds,
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "lastProbeTime": None,
                        "lastTransitionTime": since,
                        "reason": "Unschedulable",
                        "message": reason,
                    },
                ]

            self.store.mutate("pods", ns, name, unschedulable)
            self.record_event(
                pod, "FailedScheduling", reason, "Warning", component="default-scheduler"
            )
            return

        def bind(p: JSON) -> None:
            p["spec"]["nodeName"] = self.node_name
            _scheduled(p)

        bound = self.store.mutate("pods", ns, name, bind)
        assert bound is not None
        self.record_event(
            bound,
            "Scheduled",
            f"Successfully assigned {ns}/{name} to {self.node_name}",
            component="default-scheduler",
        )
        self._start_worker(bound)

    def retry_pending(self) -> None:
        for pod in self.store.list("pods"):
            if not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                md = pod["metadata"]
                asyncio.get_running_loop().call_soon(
                    self.schedule, md["namespace"], md["name"], md["uid"]
                )

    def _start_worker(self, pod: JSON) -> None:
        worker = PodWorker(self, pod)
        self.workers[worker.uid] = worker
        worker.start()
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline:
            self.spawn(self._deadline(worker, float(deadline)))

    async def _deadline(self, worker: PodWorker, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if worker.terminating or worker.final_phase:
            return
        pod = worker.pod()
        if pod is None:
            return
        message = "Pod was active on the node longer than the specified deadline"
        self.record_event(pod, "DeadlineExceeded", message, "Warning")
        worker.final_phase = "Failed"
        await worker.terminate(
            int(pod["spec"].get("terminationGracePeriodSeconds", 30)), ("DeadlineExceeded", message)
        )
        worker.terminating = False

    # -- RBAC -----------------------------------------------------------------------------------
    def authorize(self, verb: str, resource: str, namespace: str | None, name: str | None) -> None:
        """Raise 403 Forbidden like the RBAC authorizer when a deny rule matches (or the
        rule's own failure code)."""
        self.authorizations.append((verb, resource, namespace))
        for rule in list(self.deny):
            if rule.matches(verb, resource, namespace):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.deny.remove(rule)
                if rule.code != 403:
                    reason = {503: "ServiceUnavailable"}.get(rule.code, "InternalError")
                    raise ApiError(
                        rule.code, reason, f"the server cannot {verb} {resource} right now"
                    )
                base = resource.split("/", 1)[0]
                who = f'{base} "{name}"' if name else base
                where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
                details: JSON = {"kind": base}
                if name:
                    details = {"name": name, "kind": base}
                raise ApiError(
                    403,
                    "Forbidden",
                    f'{who} is forbidden: User "{self.user}" cannot {verb} resource '
                    f'"{resource}" in API group "" {where}',
                    details,
                )


def _scheduled(pod: JSON) -> None:
    """Set the PodScheduled condition to True."""
    conds = [c for c in pod["status"].get("conditions") or [] if c["type"] != "PodScheduled"]
    pod["status"]["conditions"] = [
        *conds,
        {
            "type": "PodScheduled",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": rfc3339(),
        },
    ]


def namespace_object(name: str) -> JSON:
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def _bridge_gateway(runtime: DockerRuntime) -> str:
    """The docker bridge's gateway: the host's address as the pods see it (the node IP)."""
    try:
        config = runtime.client.networks.get("bridge").attrs["IPAM"]["Config"]
        return str(config[0].get("Gateway") or "127.0.0.1")
    except Exception:
        return "127.0.0.1"


def _memory_kib() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 8 * 1024 * 1024

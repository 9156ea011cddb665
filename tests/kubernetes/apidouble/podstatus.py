"""What the double's kubelet records per container, and the pod phase and conditions it
derives from that, following the kubelet's rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .meta import JSON, rfc3339


@dataclass
class ContainerRecord:
    """What the kubelet knows about one container of the pod."""

    spec: JSON
    init: bool
    state: JSON = field(default_factory=dict)
    last_state: JSON = field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    docker_id: str | None = None
    prev_docker_id: str | None = None
    image_id: str = ""
    attempt: int = 0
    attempted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> JSON:
        out: JSON = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "image": self.spec["image"],
            "imageID": self.image_id,
            "started": self.started,
        }
        if self.docker_id:
            out["containerID"] = f"docker://{self.docker_id}"
        return out


def normalize_image(image: str) -> str:
    """``python:3`` → ``docker.io/library/python:3`` (what containerd reports)."""
    name = image
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        name += ":latest"
    return name


def pod_phase(mains: list[ContainerRecord], policy: str) -> str:
    """The phase from the main containers once initialized (the kubelet's getPhase)."""
    running = waiting = stopped = succeeded = 0
    for rec in mains:
        if "running" in rec.state:
            running += 1
        elif "terminated" in rec.state:
            stopped += 1
            succeeded += rec.state["terminated"].get("exitCode") == 0
        elif "terminated" in rec.last_state:
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running or policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Failed" if policy == "Never" else "Running"


class ConditionClock:
    """Pod conditions with ``lastTransitionTime`` kept until their status flips."""

    def __init__(self) -> None:
        self.transitions: dict[str, tuple[str, str]] = {}

    def condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> JSON:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != status:
            self.transitions[kind] = (status, rfc3339())
        cond: JSON = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.transitions[kind][1],
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def conditions(
        self, records: list[ContainerRecord], phase: str, init_done: bool, sandbox: bool
    ) -> list[JSON]:
        """PodReadyToStartContainers, Initialized, Ready and ContainersReady."""
        terminal = phase in ("Succeeded", "Failed")
        unready = [r.name for r in records if not r.init and not r.ready]
        incomplete = [r.name for r in records if r.init and not r.ready]
        if init_done:
            initialized = self.condition(
                "Initialized", True, "PodCompleted" if phase == "Succeeded" else ""
            )
        else:
            initialized = self.condition(
                "Initialized",
                False,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(incomplete)}]",
            )
        out = [self.condition("PodReadyToStartContainers", sandbox and not terminal), initialized]
        for kind in ("Ready", "ContainersReady"):
            if terminal:
                out.append(self.condition(kind, False, "PodCompleted"))
            elif unready:
                message = f"containers with unready status: [{' '.join(unready)}]"
                out.append(self.condition(kind, False, "ContainersNotReady", message))
            else:
                out.append(self.condition(kind, True))
        return out

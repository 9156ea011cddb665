"""Who owns a kernel: the server process that started it, and whether it is gone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from ..connection.ports import process_alive, process_start_time, this_hostname


@dataclass(frozen=True)
class ServerIdentity:
    """A server process: machine name, pid and the pid's start tick (against pid reuse).

    Its text form ``host.pid.start`` is what labels and annotations carry.
    """

    hostname: str
    pid: int
    start: str

    @classmethod
    @lru_cache(maxsize=1)
    def _for_pid(cls, pid: int) -> ServerIdentity:
        return cls(this_hostname(), pid, process_start_time(pid) or "0")

    @classmethod
    def current(cls) -> ServerIdentity:
        """This process (recomputed after a fork)."""
        return cls._for_pid(os.getpid())

    def __str__(self) -> str:
        return f"{self.hostname}.{self.pid}.{self.start}"

    @classmethod
    def parse(cls, text: str) -> ServerIdentity | None:
        """The identity in ``text``, or None when it is not one of ours."""
        host, _, rest = text.rpartition(".")
        hostname, _, pid = host.rpartition(".")
        if not hostname or not pid.isdigit():
            return None
        return cls(hostname, int(pid), rest)

    def is_gone(self) -> bool:
        """True when this identity's process is known to have ended.

        Only a process of this machine can be checked; others are assumed alive.
        """
        if self.hostname != this_hostname():
            return False
        return not process_alive(self.pid, "" if self.start == "0" else self.start)


def owner_is_gone(text: str) -> bool:
    """True when the owner label ``text`` names a server process of this machine that ended."""
    identity = ServerIdentity.parse(text)
    return identity is not None and identity.is_gone()


def owner_alive(text: str) -> bool | None:
    """Whether the server named by the owner label ``text`` still runs: None when that
    cannot be told from here (another machine, or not one of our labels)."""
    identity = ServerIdentity.parse(text)
    if identity is None or identity.hostname != this_hostname():
        return None
    return not identity.is_gone()


@dataclass(frozen=True)
class ServerPod:
    """The Kubernetes pod a server runs in: an owner the cluster itself can answer for.

    Its text form ``namespace/name/uid`` is what the kernel pods' owner-pod annotation
    carries. A replaced server pod has a new name and uid, so its predecessor's kernels
    are recognised as orphans even though the hostname (the pod name) changed.
    """

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}/{self.uid}"

    @classmethod
    def parse(cls, text: str) -> ServerPod | None:
        """The pod in ``namespace/name/uid`` text, or None when incomplete."""
        parts = text.strip().split("/")
        if len(parts) != 3 or not all(parts):
            return None
        return cls(*parts)

    @classmethod
    def from_env(cls) -> ServerPod | None:
        """This server's pod from $POD_NAMESPACE, $POD_NAME and $POD_UID (the chart sets
        them through the downward API); None outside such a pod."""
        env = os.environ
        return cls.parse(
            f"{env.get('POD_NAMESPACE', '')}/{env.get('POD_NAME', '')}/{env.get('POD_UID', '')}"
        )

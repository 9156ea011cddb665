"""Who owns a kernel: the server process that started it, and whether it is gone."""

from __future__ import annotations

import os
import time
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


#: The owner record of a kernel that a stopping server detached (or that a sweep found
#: persisted, its server dead): ``detached.EPOCH``, when the wait for adoption began.
DETACHED_PREFIX = "detached."


def detached_mark(at: float | None = None) -> str:
    """The owner record of a kernel detached (or found orphaned while persisted) now."""
    return f"{DETACHED_PREFIX}{int(time.time() if at is None else at)}"


def detached_since(text: str) -> float | None:
    """When the owner record ``text`` was marked detached; None when it is not a mark."""
    if not text.startswith(DETACHED_PREFIX):
        return None
    stamp = text[len(DETACHED_PREFIX) :]
    return float(stamp) if stamp.isdigit() else None


def adoptable(text: str) -> bool:
    """True when a persisted kernel with owner record ``text`` may be adopted: detached,
    or its server process is known to have ended."""
    return detached_since(text) is not None or owner_is_gone(text)


def sweep_verdict(text: str, persisted: bool, grace: float, now: float | None = None) -> str:
    """What an orphan sweep does with a kernel whose owner record is ``text``:

    - ``"keep"``: its server runs (or cannot be told from here), or it is detached and
      still inside its ``grace`` seconds of waiting for adoption;
    - ``"mark"``: persisted and its server died: write :func:`detached_mark` now, so that
      the grace starts (and the kernel is adoptable);
    - ``"remove"``: its server died without persisting it, or its grace is over.
    """
    since = detached_since(text)
    if since is not None:
        return "remove" if (time.time() if now is None else now) - since >= grace else "keep"
    if not owner_is_gone(text):
        return "keep"
    return "mark" if persisted else "remove"


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

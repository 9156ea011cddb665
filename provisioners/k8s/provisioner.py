"""The Kubernetes target's provisioner: its settings (:mod:`.settings`); each kernel runs
in a :class:`~.engine.PodEngine`, whose ``start_kernel`` creates the pod."""

from __future__ import annotations

from typing import ClassVar

from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.engine import Engine
from .engine import PodEngine
from .settings import KubernetesSettings
from .sweep import sweep_orphans


class KubernetesClusterProvisioner(KubernetesSettings, ClusterProvisioner):  # type: ignore[metaclass]
    """Starts each kernel in its own pod of a Kubernetes namespace."""

    target: ClassVar[str] = "kubernetes"
    engine_class: ClassVar[type[Engine]] = PodEngine


__all__ = ["KubernetesClusterProvisioner", "sweep_orphans"]

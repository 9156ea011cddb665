"""The Kubernetes target: kernels in pods, reached on their IP or through a port-forward.

:class:`KubernetesClusterProvisioner` holds the settings (:mod:`.settings`); a kernel's
pod is started, watched, signalled and removed by its :class:`PodEngine` (:mod:`.engine`).
"""

from __future__ import annotations

from .engine import PodEngine
from .provisioner import KubernetesClusterProvisioner
from .settings import KubernetesSettings
from .sweep import sweep_orphans

__all__ = ["KubernetesClusterProvisioner", "KubernetesSettings", "PodEngine", "sweep_orphans"]

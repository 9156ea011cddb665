"""The Kubernetes target: kernels in pods, reached on their IP or through a port-forward."""

from __future__ import annotations

from .provisioner import KubernetesClusterProvisioner, sweep_orphans

__all__ = ["KubernetesClusterProvisioner", "sweep_orphans"]

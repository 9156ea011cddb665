"""The local target: the kernel as a process of this machine (and every target's fallback)."""

from .engine import LOCAL_EXECUTOR, LocalEngine
from .provisioner import LocalClusterProvisioner

__all__ = ["LOCAL_EXECUTOR", "LocalClusterProvisioner", "LocalEngine"]

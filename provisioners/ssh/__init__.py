"""The SSH target: kernels as detached processes of a remote host, reached through SSH tunnels."""

from __future__ import annotations

from .provisioner import SSHClusterProvisioner
from .remote import sweep_orphans

__all__ = ["SSHClusterProvisioner", "sweep_orphans"]

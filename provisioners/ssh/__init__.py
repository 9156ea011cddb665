"""The SSH target: kernels as detached processes of a remote host, reached through SSH tunnels.

:mod:`.settings` holds what a kernelspec may set, :mod:`.engine` one kernel's start,
polling and removal, :mod:`.remote` the remote side (scripts, sweeps, listings).
"""

from __future__ import annotations

from .engine import SSHEngine
from .provisioner import SSHClusterProvisioner
from .remote import sweep_orphans
from .settings import SSHTargetSettings

__all__ = ["SSHClusterProvisioner", "SSHEngine", "SSHTargetSettings", "sweep_orphans"]

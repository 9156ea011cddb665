"""The SSH target's provisioner: its settings (:mod:`.settings`); the kernel runs in an
:class:`~provisioners.ssh.engine.SSHEngine`, a detached process of the remote host.

The remote side (directory layout, scripts, sweeps and listings) is in
:mod:`provisioners.ssh.remote`.
"""

from __future__ import annotations

from typing import ClassVar

from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.engine import Engine
from .engine import SSHEngine
from .remote import KERNEL_DIR_PREFIX, RemoteKernel, RemoteListeningPorts, list_remote_kernels
from .remote import sweep_orphans as sweep_orphans
from .settings import DEFAULT_REMOTE_RUNTIME_DIR, SSHTargetSettings

__all__ = [
    "DEFAULT_REMOTE_RUNTIME_DIR",
    "KERNEL_DIR_PREFIX",
    "RemoteKernel",
    "RemoteListeningPorts",
    "SSHClusterProvisioner",
    "list_remote_kernels",
    "sweep_orphans",
]

ENTRY_POINT = "cluster-ssh-provisioner"


class SSHClusterProvisioner(SSHTargetSettings, ClusterProvisioner):  # type: ignore[metaclass]
    """Starts the kernel on a remote host over SSH and reaches it through SSH tunnels."""

    target: ClassVar[str] = "ssh"
    engine_class: ClassVar[type[Engine]] = SSHEngine

"""Jupyter kernel provisioners for local processes, Docker containers, SSH hosts and
Kubernetes pods, and jupyter_client's connection API working for remote kernels too."""

from __future__ import annotations

from typing import Any

from .connection.files import (
    ConnectionFileMixin,
    KernelConnectionInfo,
    LocalPortCache,
    connection_file_content,
    find_connection_file,
    launch_kernel,
    write_connection_file,
)
from .connection.ports import ClusterPortCache, PortRange
from .exceptions import (
    EngineUnavailableError,
    KernelStartError,
    ProvisionerConfigError,
    ProvisionerError,
)
from .lifecycle.base import ClusterProvisioner
from .local import LocalClusterProvisioner, LocalEngine
from .manager import AsyncKernelManager, KernelManager
from .pool.claim import claim_warm_kernel

# The package plugs the local fallback and the warm pools into the lifecycle, which
# imports no target and no pool itself.
ClusterProvisioner.fallback_engine_class = LocalEngine
ClusterProvisioner.claim_warm_kernel = staticmethod(claim_warm_kernel)  # type: ignore[assignment]

__version__ = "0.1.0"

# The SSH functions import paramiko; load them on first use.
_TUNNEL_NAMES = ("ssh_tunnel", "forward_tunnel", "tunnel_to_kernel")


def __getattr__(name: str) -> Any:
    if name in _TUNNEL_NAMES:
        from .connection import tunnels

        return getattr(tunnels, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "AsyncKernelManager",
    "ClusterPortCache",
    "ClusterProvisioner",
    "ConnectionFileMixin",
    "EngineUnavailableError",
    "KernelConnectionInfo",
    "KernelManager",
    "KernelStartError",
    "LocalClusterProvisioner",
    "LocalPortCache",
    "PortRange",
    "ProvisionerConfigError",
    "ProvisionerError",
    "connection_file_content",
    "find_connection_file",
    "forward_tunnel",
    "launch_kernel",
    "ssh_tunnel",
    "tunnel_to_kernel",
    "write_connection_file",
]

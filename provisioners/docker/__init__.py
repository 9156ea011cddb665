"""The Docker target: kernels in containers, reached on published ports or the container IP."""

from __future__ import annotations

from .daemon import (
    LABEL_KERNEL_ID,
    LABEL_KERNELSPEC,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    LABEL_PORTS,
    MANAGED_BY,
    DockerPortSource,
    connect_docker,
    connection_archive,
    parse_gpus,
    parse_ports_label,
    sweep_orphans,
)
from .engine import DOCKER_EXECUTOR, DockerEngine
from .provisioner import DockerClusterProvisioner

__all__ = [
    "DOCKER_EXECUTOR",
    "LABEL_KERNELSPEC",
    "LABEL_KERNEL_ID",
    "LABEL_MANAGED_BY",
    "LABEL_OWNER",
    "LABEL_PORTS",
    "MANAGED_BY",
    "DockerClusterProvisioner",
    "DockerEngine",
    "DockerPortSource",
    "connect_docker",
    "connection_archive",
    "parse_gpus",
    "parse_ports_label",
    "sweep_orphans",
]

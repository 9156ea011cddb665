"""The Docker target's provisioner: its settings; each kernel runs in a :class:`DockerEngine`.

The start, the container and its daemon are in :mod:`.engine`; daemon access outside a
kernel's lifecycle (clients, labels, the orphan sweep) in :mod:`.daemon`; the settings in
:mod:`.settings`.
"""

from __future__ import annotations

from typing import ClassVar

from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.engine import Engine
from .engine import DockerEngine
from .settings import DockerSettings


class DockerClusterProvisioner(DockerSettings, ClusterProvisioner):  # type: ignore[metaclass]
    """Starts each kernel in a Docker container and publishes its five ports."""

    target: ClassVar[str] = "docker"
    engine_class: ClassVar[type[Engine]] = DockerEngine

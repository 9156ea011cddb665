"""The local target's provisioner: its settings; the kernel runs in a :class:`LocalEngine`."""

from __future__ import annotations

from typing import ClassVar

from traitlets import Bool

from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.engine import Engine
from .engine import LocalEngine


class LocalClusterProvisioner(ClusterProvisioner):
    """Starts the kernel as a local subprocess, with ports from the cluster-aware cache."""

    target: ClassVar[str] = "local"
    engine_class: ClassVar[type[Engine]] = LocalEngine

    inherit_server_env = Bool(
        True,
        config=True,
        help="""Pass the server's environment to the kernel, as jupyter_client does. Set it
        False to give the kernel only the kernelspec's env, this provisioner's 'env' and the
        KERNEL_* values of the start request, as remote targets do.""",
    )

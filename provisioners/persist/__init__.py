"""Kernels that outlive their server: detached as it stops, adopted by the next one.

Set ``persist_kernels`` in a kernelspec's provisioner config (Docker, SSH, Kubernetes)
and enable this package as a Jupyter Server extension::

    c.ServerApp.jpserver_extensions = {"provisioners.persist": True}

As the server stops (SIGTERM, a rollout, a restart) its persisted kernels are detached
instead of shut down; the next server adopts them under the same kernel ids before it
serves a request, and every ``adopt_interval`` seconds after that (kernels of a server
that died, or of one that stopped while this one was starting).
"""

from __future__ import annotations

from typing import Any

from .adopt import adopt_kernels, detach_kernels

__all__ = ["adopt_kernels", "detach_kernels"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server import PersistExtension

    return [{"module": "provisioners.persist", "app": PersistExtension}]

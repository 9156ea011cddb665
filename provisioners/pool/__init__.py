"""Warm kernel pools: kernels started before a request, claimed by it in milliseconds.

Set ``pool_size`` in a kernelspec's provisioner config. To fill pools when Jupyter
Server starts (rather than on a kernelspec's first kernel) and drain them when it stops,
enable this package as a server extension and name the kernelspecs::

    c.ServerApp.jpserver_extensions = {"provisioners.pool": True}
    c.KernelPools.prefill = ["python-docker"]
    c.KernelPools.max_total = 8
"""

from __future__ import annotations

from typing import Any

from .pools import KernelPools

__all__ = ["KernelPools"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server import PoolExtension

    return [{"module": "provisioners.pool", "app": PoolExtension}]

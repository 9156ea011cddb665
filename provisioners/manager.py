"""Kernel managers whose kernels start through our provisioners by default.

jupyter_client's managers pick its own ``local-provisioner`` for a kernelspec that names
none; these pick ``cluster-local-provisioner`` instead, so ``from provisioners import
KernelManager`` starts kernels with the cluster-aware port cache. A kernelspec that names
a provisioner keeps it.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager as _AsyncKernelManager
from jupyter_client.manager import KernelManager as _KernelManager

DEFAULT_PROVISIONER = "cluster-local-provisioner"


def with_default_provisioner(spec: KernelSpec | None) -> KernelSpec | None:
    """``spec`` with ``metadata.kernel_provisioner`` set to ours when it names none."""
    if spec is not None and "kernel_provisioner" not in spec.metadata:
        spec.metadata = {
            **spec.metadata,
            "kernel_provisioner": {"provisioner_name": DEFAULT_PROVISIONER, "config": {}},
        }
    return spec


class KernelManager(_KernelManager):
    """jupyter_client's blocking KernelManager, defaulting to our local provisioner."""

    @property
    def kernel_spec(self) -> Any:
        return with_default_provisioner(super().kernel_spec)


class AsyncKernelManager(_AsyncKernelManager):
    """jupyter_client's AsyncKernelManager, defaulting to our local provisioner."""

    @property
    def kernel_spec(self) -> Any:
        return with_default_provisioner(super().kernel_spec)

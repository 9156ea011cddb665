"""Kernel managers whose kernels start through our provisioners by default.

jupyter_client's managers pick its own ``local-provisioner`` for a kernelspec that names
none; these pick ``cluster-local-provisioner`` instead, so ``from provisioners import
KernelManager`` starts kernels with the cluster-aware port cache. A kernelspec that names
a provisioner keeps it, and so does a default the user chose: the
``JUPYTER_DEFAULT_PROVISIONER_NAME`` variable or
``KernelProvisionerFactory.default_provisioner_name`` (config or instance) wins over ours.
"""

from __future__ import annotations

import os
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager as _AsyncKernelManager
from jupyter_client.manager import KernelManager as _KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config import Configurable

DEFAULT_PROVISIONER = "cluster-local-provisioner"
#: jupyter_client's own default, used when nobody chose another.
STOCK_DEFAULT_PROVISIONER = "local-provisioner"


def user_chose_default(manager: Configurable | None = None) -> bool:
    """True when the user picked jupyter_client's default provisioner themselves.

    That is the ``JUPYTER_DEFAULT_PROVISIONER_NAME`` variable, a
    ``KernelProvisionerFactory.default_provisioner_name`` in ``manager``'s config, or a
    factory instance whose default is not jupyter_client's own.
    """
    if os.environ.get(KernelProvisionerFactory.default_provisioner_name_env):
        return True
    if manager is not None:
        section = manager.config.get("KernelProvisionerFactory", {})
        if "default_provisioner_name" in section:
            return True
    if KernelProvisionerFactory.initialized():
        chosen = KernelProvisionerFactory.instance().default_provisioner_name
        return bool(chosen != STOCK_DEFAULT_PROVISIONER)
    return False


def with_default_provisioner(
    spec: KernelSpec | None, manager: Configurable | None = None
) -> KernelSpec | None:
    """``spec`` with ``metadata.kernel_provisioner`` set to ours when it names none.

    Left as it is when the user chose the default provisioner (see
    :func:`user_chose_default`).
    """
    if (
        spec is not None
        and "kernel_provisioner" not in spec.metadata
        and not user_chose_default(manager)
    ):
        spec.metadata = {
            **spec.metadata,
            "kernel_provisioner": {"provisioner_name": DEFAULT_PROVISIONER, "config": {}},
        }
    return spec


class KernelManager(_KernelManager):
    """jupyter_client's blocking KernelManager, defaulting to our local provisioner."""

    @property
    def kernel_spec(self) -> Any:
        return with_default_provisioner(super().kernel_spec, self)


class AsyncKernelManager(_AsyncKernelManager):
    """jupyter_client's AsyncKernelManager, defaulting to our local provisioner."""

    @property
    def kernel_spec(self) -> Any:
        return with_default_provisioner(super().kernel_spec, self)

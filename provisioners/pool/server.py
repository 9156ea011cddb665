"""The ``provisioners.pool`` Jupyter Server extension: fill pools at start, drain at stop."""

from __future__ import annotations

import uuid
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.extension.application import ExtensionApp

from ..usernames import settings_using_username
from .pools import KernelPools


class PoolExtension(ExtensionApp):
    """Fills the pools of ``KernelPools.prefill`` as the server starts; drains them as it stops."""

    name = "provisioners.pool"
    load_other_extensions = True

    def initialize_settings(self) -> None:
        serverapp: Any = self.serverapp
        pools = KernelPools.instance(config=serverapp.config)
        for spec_name in pools.prefill:
            self._prefill(serverapp, spec_name)

    def _prefill(self, serverapp: Any, spec_name: str) -> None:
        from ..lifecycle.base import ClusterProvisioner

        manager = serverapp.kernel_manager
        try:
            spec = serverapp.kernel_spec_manager.get_kernel_spec(spec_name)
            provisioner = KernelProvisionerFactory.instance(
                parent=manager
            ).create_provisioner_instance(f"prefill-{uuid.uuid4()}", spec, parent=manager)
        except Exception as exc:
            self.log.warning("KernelPools.prefill: kernelspec %r unusable: %s", spec_name, exc)
            return
        if not isinstance(provisioner, ClusterProvisioner) or provisioner.pool_size <= 0:
            self.log.warning(
                "KernelPools.prefill names kernelspec %r, which has no pool "
                "(set pool_size in its cluster provisioner config)",
                spec_name,
            )
            return
        per_user = settings_using_username(provisioner)
        if per_user:
            self.log.warning(
                "KernelPools.prefill: kernelspec %r keeps no warm kernels: its %s vary by "
                "user ({username}), and each of its kernels starts for its user",
                spec_name,
                ", ".join(per_user),
            )
            return
        KernelPools.instance().ensure(provisioner)  # the provisioner is the pool's template

    async def stop_extension(self) -> None:
        if KernelPools.initialized():
            await KernelPools.instance().drain(confirm=False)  # inside the stop's grace

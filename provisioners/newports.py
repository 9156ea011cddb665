"""Fresh ports for a restart that asks for them (``newports=True``), with no port-0 window.

jupyter_client's restart runs ``cleanup(restart=True)``, then zeroes the manager's
random ports (``cleanup_random_ports``), then starts the kernel again. Its restarter asks
for new ports when a kernel dies in its first seconds, and Jupyter Server reconnects a
notebook's channels at that very moment: a manager whose ports read 0 until the engine
has started the kernel (a second or more for a container) leaves the notebook on port 0.

So the spare set is reserved during ``cleanup`` (an await is fine there), and
``pre_launch`` takes it over before its first await, writing the ports the restarted
kernel will be reached on into the manager at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .connection.ports import ClusterPortCache
from .exceptions import ProvisionerError

if TYPE_CHECKING:
    from .base import ClusterProvisioner

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")


class SparePorts:
    """A set of ports held for the next restart of one kernel, under its port owner."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    async def reserve(self, provisioner: ClusterProvisioner) -> None:
        """Hold as many fresh ports as the kernel has, on the same host."""
        self.ports = []
        runner = provisioner.runner
        if not provisioner.kernel_port_list or not runner.needs_ports():
            return
        try:
            self.ports = await runner.executor.run(
                ClusterPortCache.instance().allocate,
                len(provisioner.kernel_port_list),
                provisioner.allocation_owner,
                host=provisioner.kernel_port_host,
                port_range=provisioner.port_range,
                sources=runner.port_sources(),
            )
        except ProvisionerError as exc:
            provisioner.log.debug(
                "Kernel %s: no spare ports for a restart: %s", provisioner.kernel_id, exc
            )

    def take(self, provisioner: ClusterProvisioner, tunneled: bool) -> tuple[list[int], list[int]]:
        """``(ports the kernel uses now, ports to give back)``; never awaits.

        Without newports (the manager's ports are not 0) the kernel keeps its ports and
        the spare set goes back. With it, the spare set becomes the kernel's and the
        manager at once shows where the restarted kernel will be reached: its new ports,
        or, through tunnels or where the address is known only once it runs, its old
        client ports (stale for a moment, never 0).
        """
        spare, self.ports = self.ports, []
        current = list(provisioner.kernel_port_list)
        km = provisioner.parent
        if not spare or not hasattr(km, "cleanup_random_ports"):
            return current, spare
        if not any(getattr(km, name, None) == 0 for name in PORT_NAMES):
            return current, spare
        client: dict[str, Any] = dict(provisioner.connection_info)
        shown = [int(client.get(name, 0)) for name in PORT_NAMES]
        if not tunneled and provisioner.runner.reached_on_own_ports():
            shown = spare
        for name, port in zip(PORT_NAMES, shown, strict=True):
            if port and getattr(km, name, None) == 0:
                setattr(km, name, port)
        provisioner.log.debug("Kernel %s: restarting on new ports", provisioner.kernel_id)
        return spare, current

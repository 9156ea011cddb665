"""Detach a server's persisted kernels, and adopt them into the next server's manager.

Adoption builds each kernel's manager the way jupyter_client's MultiKernelManager and
Jupyter Server's MappingKernelManager would have built it at start: same kernel id,
connection info, HMAC key and Curve keys, then registered so that activity tracking,
culling, the restarter and ``/api/kernels`` treat it as one of the server's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory

from ..exceptions import ProvisionerError
from ..lifecycle.base import ClusterProvisioner

_log = logging.getLogger(__name__)


async def detach_kernels(mkm: Any, timeout: float = 20.0) -> list[str]:
    """Detach every kernel of ``mkm`` whose provisioner persists it, and drop it from the
    manager (without a shutdown, so the server's ``cleanup_kernels`` leaves it running).
    Bounded by ``timeout`` in all; returns the detached kernel ids."""
    log = getattr(mkm, "log", _log)
    chosen = []
    for kernel_id in list(getattr(mkm, "_kernels", {})):
        km = mkm._kernels.get(kernel_id)
        provisioner = getattr(km, "provisioner", None)
        if isinstance(provisioner, ClusterProvisioner) and provisioner.persists:
            chosen.append((kernel_id, km, provisioner))
    if not chosen:
        return []
    # Stop watching first: the restarter must not restart a kernel that is let go.
    for kernel_id, km, _ in chosen:
        _forget(mkm, kernel_id, km)
    results = await asyncio.wait_for(
        asyncio.gather(*(p.detach() for _, _, p in chosen), return_exceptions=True),
        timeout,
    )
    detached = []
    for (kernel_id, _, _), result in zip(chosen, results, strict=True):
        if result is True:
            detached.append(kernel_id)
        elif isinstance(result, BaseException):
            log.warning("Kernel %s: detaching failed: %s", kernel_id, result)
    return detached


def _forget(mkm: Any, kernel_id: str, km: Any) -> None:
    """Take a detached kernel out of the server's maps without shutting it down."""
    km.stop_restarter()
    if hasattr(mkm, "stop_watching_activity"):
        try:
            mkm.stop_watching_activity(kernel_id)
        except Exception as exc:  # the kernel's iopub stream may be closed already
            _log.debug("Kernel %s: stop watching activity: %s", kernel_id, exc)
    mkm.remove_kernel(kernel_id)
    for name in ("_kernel_connections", "_kernel_ports", "_pending_kernel_tasks"):
        getattr(mkm, name, {}).pop(kernel_id, None)
    km.cleanup_connection_file()  # this server's copy; the kernel keeps its own


async def adopt_kernels(mkm: Any) -> list[str]:
    """Adopt the kernels that stopped or dead servers left, for every kernelspec of
    ``mkm``'s kernelspec manager whose provisioner persists kernels. Returns the adopted
    kernel ids; an engine that cannot be reached, or a kernel that cannot be adopted, is
    logged and skipped (the next round tries again)."""
    log = getattr(mkm, "log", _log)
    adopted: list[str] = []
    specs = await _kernelspecs(mkm)
    for spec_name, spec in specs.items():
        try:
            template = _provisioner(mkm, f"adopt-{spec_name}", spec, parent=mkm)
        except Exception as exc:
            log.debug("kernelspec %r: no provisioner to adopt with: %s", spec_name, exc)
            continue
        if not isinstance(template, ClusterProvisioner) or not template.persist_kernels:
            continue
        try:
            records = await template.adoptable_kernels()
        except Exception as exc:
            log.warning("kernelspec %r: cannot look for kernels to adopt: %s", spec_name, exc)
            continue
        for info in records:
            kernel_id = info["kernel_id"]
            if kernel_id in mkm:
                continue
            started = time.monotonic()
            try:
                await adopt_kernel(mkm, spec_name, info)
            except Exception as exc:
                log.warning("Kernel %s (%s): adoption failed: %s", kernel_id, spec_name, exc)
                continue
            adopted.append(kernel_id)
            log.info(
                "Kernel %s (%s): adopted in %.2f s",
                kernel_id,
                spec_name,
                time.monotonic() - started,
            )
    return adopted


async def adopt_kernel(mkm: Any, spec_name: str, info: dict[str, Any]) -> Any:
    """Register the running kernel described by ``info`` (a provisioner info, with its
    ``kernel_id``) in ``mkm`` under its own id; returns its kernel manager."""
    kernel_id = info["kernel_id"]
    km = mkm.kernel_manager_factory(
        connection_file=os.path.join(mkm.connection_dir, f"kernel-{kernel_id}.json"),
        parent=mkm,
        log=mkm.log,
        kernel_name=spec_name,
    )
    km.kernel_id = kernel_id
    provisioner = _provisioner(mkm, kernel_id, km.kernel_spec, parent=km)
    if not isinstance(provisioner, ClusterProvisioner):
        msg = f"kernelspec {spec_name!r} no longer uses a cluster provisioner"
        raise ProvisionerError(msg, kernel_id=kernel_id)
    await provisioner.load_provisioner_info(info)
    if not provisioner.has_process:
        await provisioner.cleanup(restart=False)
        msg = "the kernel is gone from its engine"
        raise ProvisionerError(msg, target=provisioner.target, kernel_id=kernel_id)
    km.provisioner = provisioner
    km.load_connection_info(provisioner.connection_info)
    if provisioner.curve_keys is not None and hasattr(km, "curve_publickey"):
        km.curve_publickey, km.curve_secretkey = provisioner.curve_keys
    km._launch_args = {}  # a restart starts it with the kernelspec's own env and cwd
    km.write_connection_file()
    ready = km.ready
    if not ready.done():
        ready.set_result(None)
    await provisioner.post_launch()
    _register(mkm, kernel_id, km)
    return km


def _register(mkm: Any, kernel_id: str, km: Any) -> None:
    """What Jupyter Server's MappingKernelManager does for a kernel it started."""
    mkm._kernels[kernel_id] = km
    km.execution_state = "idle"
    km.reason = ""
    km.last_activity = datetime.now(timezone.utc)
    if hasattr(mkm, "_kernel_connections"):
        mkm._kernel_connections[kernel_id] = 0
        mkm._kernel_ports[kernel_id] = km.ports
        mkm.start_watching_activity(kernel_id)
        mkm.add_restart_callback(kernel_id, lambda: mkm._handle_kernel_died(kernel_id), "dead")
        if not getattr(mkm, "_initialized_culler", True):
            mkm.initialize_culler()
    if getattr(km, "autorestart", False):
        km.start_restarter()


async def _kernelspecs(mkm: Any) -> dict[str, Any]:
    ksm = mkm.kernel_spec_manager
    names = await asyncio.to_thread(lambda: sorted(ksm.find_kernel_specs()))
    specs = {}
    for name in names:
        try:
            specs[name] = await asyncio.to_thread(ksm.get_kernel_spec, name)
        except Exception as exc:
            _log.debug("kernelspec %r unreadable: %s", name, exc)
    return specs


def _provisioner(mkm: Any, kernel_id: str, spec: Any, parent: Any) -> Any:
    factory = KernelProvisionerFactory.instance(parent=mkm)
    return factory.create_provisioner_instance(kernel_id, spec, parent=parent)

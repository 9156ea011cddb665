"""Detach a server's persisted kernels, and adopt them into the next server's manager.

Adoption goes through the manager's own ``start_kernel(kernel_id=..., kernel_name=...)``:
the provisioner serves that start with the running kernel
(:meth:`ClusterProvisioner.expect_adoption`), so Jupyter Server registers it as any kernel
it starts, under the same kernel id, with its connection info, HMAC key and Curve keys:
activity tracking, culling, the restarter and ``/api/kernels`` treat it as its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory

from .. import metrics
from ..executor import EngineExecutor
from ..lifecycle.base import ClusterProvisioner

_log = logging.getLogger(__name__)
#: Kernels adopted at once (each a few engine calls and a kernel manager).
_AT_ONCE = 8
#: Kernelspec files are read here, off the event loop.
_executor = EngineExecutor("persist", max_workers=1)


async def detach_kernels(mkm: Any, timeout: float = 20.0) -> list[str]:
    """Detach every kernel of ``mkm`` whose provisioner persists it, and drop it from the
    manager (without a shutdown, so the server's ``cleanup_kernels`` leaves it running).
    Bounded by ``timeout`` in all; returns the detached kernel ids."""
    log = getattr(mkm, "log", _log)
    chosen = []
    for kernel_id in mkm.list_kernel_ids():
        km = mkm.get_kernel(kernel_id)
        provisioner = getattr(km, "provisioner", None)
        if isinstance(provisioner, ClusterProvisioner) and provisioner.persists:
            chosen.append((kernel_id, km, provisioner))
    if not chosen:
        return []
    for kernel_id, km, _ in chosen:  # the restarter must not restart a kernel let go
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
    km.cleanup_connection_file()  # this server's copy; the kernel keeps its own


async def adopt_kernels(mkm: Any) -> list[str]:
    """Adopt the kernels that stopped or dead servers left, for every kernelspec of
    ``mkm``'s kernelspec manager whose provisioner persists kernels. Returns the adopted
    kernel ids; an engine that cannot be reached, or a kernel that cannot be adopted, is
    logged and skipped (the next round tries again)."""
    log = getattr(mkm, "log", _log)
    adopted: list[str] = []
    for spec_name, spec in (await _kernelspecs(mkm)).items():
        try:
            factory = KernelProvisionerFactory.instance(parent=mkm)
            template = factory.create_provisioner_instance(f"adopt-{spec_name}", spec, parent=mkm)
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
        gate = asyncio.Semaphore(_AT_ONCE)
        target = template.engine.target
        results = await asyncio.gather(
            *(
                _adopt_one(mkm, spec_name, target, info, gate, log)
                for info in records
                if info["kernel_id"] not in mkm
            )
        )
        adopted += [kernel_id for kernel_id in results if kernel_id]
    return adopted


async def _adopt_one(
    mkm: Any,
    spec_name: str,
    target: str,
    info: dict[str, Any],
    gate: asyncio.Semaphore,
    log: Any,
) -> str:
    """Adopt one kernel through the manager's start; its id, or '' when that failed."""
    kernel_id = str(info["kernel_id"])
    async with gate:
        started = time.monotonic()
        ClusterProvisioner.expect_adoption(info)
        try:
            await mkm.start_kernel(kernel_id=kernel_id, kernel_name=spec_name)
        except Exception as exc:
            log.warning("Kernel %s (%s): adoption failed: %s", kernel_id, spec_name, exc)
            metrics.record_adoption(target, "failed")
            return ""
        finally:
            ClusterProvisioner.forget_adoption(kernel_id)
    metrics.record_adoption(target, "adopted")
    log.info("Kernel %s (%s): adopted in %.2f s", kernel_id, spec_name, time.monotonic() - started)
    return kernel_id


async def _kernelspecs(mkm: Any) -> dict[str, Any]:
    ksm = mkm.kernel_spec_manager
    names = sorted(await _executor.run(ksm.find_kernel_specs))
    specs = {}
    for name in names:
        try:
            specs[name] = await _executor.run(ksm.get_kernel_spec, name)
        except Exception as exc:
            _log.debug("kernelspec %r unreadable: %s", name, exc)
    return specs

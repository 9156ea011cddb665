"""Claiming a warm kernel for a start request, and the rule for when a start is cold.

A warm kernel was started before the request, so nothing of the request can reach it
through its environment, its working directory or its command line. The rule: a start
claims a warm kernel only when the request carries none of those inputs, namely

- launch parameters all at their defaults (:mod:`provisioners.parameters`),
- no ``KERNEL_*`` (or other) variable of the request that the kernel would see, except
  the names in ``pool_optional_env`` (``JPY_SESSION_NAME`` by default, logged) and
  launch parameters given their default values,
- no working directory, where the target passes it to the kernel (a local process),
- no extra arguments for the kernel's command,

and when the warm kernel gives what the request asks for: the same transport, and
CurveZMQ when the request's encryption policy asks for it. Otherwise the start is cold
and the log says why.

A kernelspec whose settings vary by user (``{username}`` in a volume, the namespace, the
working directory or env; a claim per user) never claims: its kernels are made for their
user. Elsewhere ``KERNEL_USERNAME`` is optional for a claim (a warm kernel runs without
it) and the engine records the claiming request's user on the claimed kernel.

A restart of a claimed kernel is a cold start in place: the same kernel id, HMAC key and
Curve keys (clients stay connected), a new container or pod.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..connection.ports import ClusterPortCache
from ..settings import is_request_input, requested_env_names
from ..usernames import settings_using_username
from .pools import KernelPools

if TYPE_CHECKING:
    from ..lifecycle.base import ClusterProvisioner
    from ..lifecycle.engine import Engine


def cold_reason(provisioner: ClusterProvisioner, kwargs: dict[str, Any]) -> str:
    """Why the request in ``kwargs`` cannot be served by a warm kernel ('' if it can)."""
    return _cold(provisioner, kwargs)[1]


def _cold(provisioner: ClusterProvisioner, kwargs: dict[str, Any]) -> tuple[str, str]:
    """:func:`cold_reason` with its miss reason (:data:`provisioners.metrics.MISS_REASONS`)."""
    per_user = settings_using_username(provisioner)
    if per_user:
        names = ", ".join(per_user)
        return "per_user", f"the kernelspec's {names} vary by user ({{username}})"
    params = provisioner.launch_parameters
    if params is not None and not params.defaults:
        changed = params.describe_changes()
        return "parameters", f"launch parameters differ from the defaults ({changed})"
    requested = requested_env_names(kwargs.get("env"))
    passed = {
        name for name in requested if provisioner.inherit_server_env or is_request_input(name)
    }
    defaults = set(params.env()) if params is not None else set()  # what warm kernels have
    optional = {*provisioner.pool_optional_env, "KERNEL_USERNAME"}  # recorded on the claim
    missing = sorted(passed - optional - defaults)
    if missing:
        names = ", ".join(missing)
        return "request_env", f"the request sets {names}, which a warm kernel was started without"
    cwd = kwargs.get("cwd")
    if cwd and provisioner.engine.uses_request_cwd() and os.path.abspath(cwd) != os.getcwd():
        return "cwd", f"the request's working directory {cwd!r} is not the warm kernels' one"
    if kwargs.get("extra_arguments"):
        return "arguments", "the request passes extra arguments to the kernel's command"
    if getattr(provisioner.parent, "transport", "tcp") != "tcp":
        return "transport", "warm kernels use the tcp transport"
    return "", ""


def warm_mismatch(provisioner: ClusterProvisioner, warm: Engine) -> str:
    """Why ``warm`` does not give what the request asks for ('' when it does)."""
    return _mismatch(provisioner, warm)[1]


def _mismatch(provisioner: ClusterProvisioner, warm: Engine) -> tuple[str, str]:
    """:func:`warm_mismatch` with its miss reason."""
    wants_curve = provisioner.select_curve_keys() is not None
    if wants_curve and warm.curve_keys is None:
        return (
            "encryption",
            "the request asks for CurveZMQ encryption and the warm kernels have none",
        )
    if warm.kernel_bind_ip() != provisioner.engine.kernel_bind_ip():
        return "address", "the warm kernels listen on another address"
    return "", ""


async def claim_warm_kernel(provisioner: ClusterProvisioner, kwargs: dict[str, Any]) -> bool:
    """Hand a ready warm kernel to ``provisioner``; False when the start must be cold."""
    if provisioner.pool_size <= 0 or provisioner.pool_id:
        return False
    log, kernel_id, spec = provisioner.log, provisioner.kernel_id, provisioner.spec_name
    miss, reason = _cold(provisioner, kwargs)
    if miss:
        log.info("Kernel %s: cold start, not from the pool: %s", kernel_id, reason)
        metrics.record_miss(spec, miss)
        return False
    pools = KernelPools.instance(config=provisioner.config)
    pools.ensure(provisioner)  # the kernelspec's pool is created at its first claim
    warm = await pools.take(provisioner)
    if warm is None:
        log.info("Kernel %s: cold start, no warm kernel is ready", kernel_id)
        metrics.record_miss(spec, "empty")
        return False
    miss, reason = _mismatch(provisioner, warm)
    if miss:
        await pools.give_back(provisioner, warm)
        log.info("Kernel %s: cold start, not from the pool: %s", kernel_id, reason)
        metrics.record_miss(spec, miss)
        return False
    pool_id = warm.kernel_id
    try:
        if warm.ports:
            await warm.executor.run(
                ClusterPortCache.instance().rename,
                warm.allocation_owner,
                provisioner.allocation_owner,
            )
        warm.kernel_id = kernel_id
        warm.pool_id = ""
        warm.claimed_from = pool_id
        await warm.claim_kernel(pool_id, provisioner.username)
    except Exception as exc:
        log.warning(
            "Kernel %s: claiming warm kernel %s failed; removing it, starting cold: %s",
            kernel_id,
            pool_id,
            exc,
        )
        await pools.retire(provisioner, warm)
        metrics.record_miss(spec, "claim_failed")
        return False
    provisioner.claim_warm_engine(warm)
    metrics.record_claim(spec)
    optional = {*provisioner.pool_optional_env, "KERNEL_USERNAME"}
    skipped = sorted(requested_env_names(kwargs.get("env")) & optional)
    provisioner.progress(
        "claimed",
        f"warm kernel {pool_id}" + (f" (without {', '.join(skipped)})" if skipped else ""),
    )
    return True

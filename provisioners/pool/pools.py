"""The warm-kernel pools of this process: where they fill, the cap, and their drain.

Pools are created explicitly: a kernelspec's pool (``pool_size`` > 0 in its config) is
created, and starts filling, at its first claim in the process, or when the server
starts for the kernelspecs named in ``KernelPools.prefill`` (the ``provisioners.pool``
server extension). Warm kernels are
owned by this process like any other kernel: a clean exit drains them (the server
extension's stop, or the interpreter's exit), and after a SIGKILLed server the targets'
orphan sweeps remove them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from traitlets import Float, Int, List, Unicode
from traitlets.config import SingletonConfigurable

from .. import metrics
from .warm import PoolLoop, WarmPool, pool_key

if TYPE_CHECKING:
    from ..lifecycle.base import ClusterProvisioner
    from ..lifecycle.engine import Engine


class KernelPools(SingletonConfigurable):
    """This process's warm-kernel pools, one per kernelspec (and provisioner config)."""

    max_total = Int(
        8,
        min=0,
        config=True,
        help="""Most warm kernels this process keeps across all kernelspecs (started or
        starting), so that pools cannot fill a node or a namespace's quota. Pools fill in
        turn up to it; claimed kernels do not count.""",
    )
    prefill = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Kernelspec names whose pools fill when Jupyter Server starts (with the
        'provisioners.pool' server extension enabled), instead of on the kernelspec's
        first kernel start. Each needs pool_size > 0 in its provisioner config.""",
    )
    max_starting = Int(
        4,
        min=1,
        config=True,
        help="""Warm kernels this process starts at once, across pools: filling a large
        pool in steps keeps the machine and the engine free for the kernels in use.""",
    )
    refill_delay = Float(
        1.0,
        min=0.0,
        config=True,
        help="""Seconds between a claim and the start of its pool's refill, so that the
        claimed kernel answers its first messages while no container or pod is starting.""",
    )
    drain_timeout = Int(
        60,
        min=1,
        config=True,
        help="Seconds a drain (server stop, interpreter exit) may take to remove warm kernels.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[str, WarmPool] = {}
        self._lock = threading.Lock()
        self._loop: PoolLoop | None = None
        _register_exit_drain()

    # ------------------------------------------------------------------ from any thread

    def ensure(self, provisioner: ClusterProvisioner) -> None:
        """Create (and start filling) the pool of ``provisioner``'s kernelspec, once."""
        if provisioner.pool_size <= 0 or provisioner.pool_id:
            return  # a warm kernel's own provisioner
        key = pool_key(provisioner)
        with self._lock:
            if key in self._pools and not self._pools[key].closed:
                return
            pool = self._pools[key] = WarmPool(provisioner, self)
            if self._loop is None:
                self._loop = PoolLoop.hold(self)
            loop = self._loop
        self.log.info(
            "Kernel pool %r (%s): keeping %d warm kernel(s)", pool.spec_name, pool.target, pool.size
        )
        loop.loop.call_soon_threadsafe(pool.fill)

    def room(self) -> int:
        """Warm kernels that may still be started under ``max_total`` (on the pool loop)."""
        with self._lock:
            pools = list(self._pools.values())
        return self.max_total - sum(p.held for p in pools if not p.closed)

    def starting_room(self) -> int:
        """Warm kernels that may still start now under ``max_starting`` (on the pool loop)."""
        return self.max_starting - sum(p.starting for p in self.pools())

    def fill_all(self) -> None:
        """Let every open pool start what it lacks (on the pool loop)."""
        for pool in self.pools():
            pool.fill()

    def pools(self) -> list[WarmPool]:
        with self._lock:
            return list(self._pools.values())

    def counts(self) -> list[tuple[str, int, int, int]]:
        """``(kernelspec, ready, starting, pool_size)`` of each open pool (from any thread:
        what the metrics read when scraped)."""
        return [
            (p.spec_name, len(p.ready), p.starting, p.size) for p in self.pools() if not p.closed
        ]

    # ------------------------------------------------------------------ claims

    async def take(self, provisioner: ClusterProvisioner) -> Engine | None:
        """A ready warm kernel for ``provisioner``'s kernelspec, or None (then start cold)."""
        with self._lock:
            pool = self._pools.get(pool_key(provisioner))
            loop = self._loop
        if pool is None or loop is None or pool.closed:
            return None
        return await loop.run(pool.take())

    async def give_back(self, provisioner: ClusterProvisioner, warm: Engine) -> None:
        """Put an unclaimed warm kernel back (its claim was refused before any change)."""
        with self._lock:
            pool = self._pools.get(pool_key(provisioner))
            loop = self._loop
        if pool is None or loop is None:
            await self.retire(provisioner, warm)
            return
        loop.loop.call_soon_threadsafe(pool.give_back, warm)

    async def retire(self, provisioner: ClusterProvisioner, warm: Engine) -> None:
        """Remove a warm kernel whose claim failed half-way."""
        holder = WarmPool(provisioner, self).provisioner(warm.kernel_id)
        holder.take_engine(warm)
        await holder.cleanup(restart=False)

    # ------------------------------------------------------------------ drain

    async def drain(self, spec_name: str | None = None, *, confirm: bool = True) -> None:
        """Remove the warm kernels of ``spec_name`` (every pool when None); no refill.
        Without ``confirm`` (a server's stop, the interpreter's exit) removals are asked
        for and not awaited to their end (see :meth:`WarmPool.drain`)."""
        with self._lock:
            chosen = [
                p for p in self._pools.values() if spec_name is None or p.spec_name == spec_name
            ]
            for pool in chosen:
                self._pools.pop(pool.key, None)
            loop = self._loop
            if loop is not None and not self._pools:
                self._loop = None
        if loop is None:
            return
        for pool in chosen:
            pool.closed = True
        try:
            if chosen:
                await loop.run(_drain_all(chosen, confirm))
        finally:
            if self._loop is None:
                loop.release(self)

    def drain_blocking(self) -> None:
        """:meth:`drain` for a caller without an event loop (interpreter exit)."""
        if not self.pools():
            return
        try:
            asyncio.run(asyncio.wait_for(self.drain(confirm=False), self.drain_timeout))
        except Exception as exc:
            self.log.warning("Draining the kernel pools at exit failed: %s", exc)


def _pool_counts() -> list[tuple[str, int, int, int]]:
    """The pools' counts for the metrics; none before a pool exists."""
    return KernelPools.instance().counts() if KernelPools.initialized() else []


metrics.set_pool_source(_pool_counts)


async def _drain_all(pools: list[WarmPool], confirm: bool) -> None:
    await asyncio.gather(*(p.drain(confirm=confirm) for p in pools), return_exceptions=True)


_exit_registered = False


def _register_exit_drain() -> None:
    """Drain at interpreter exit, before the engines' thread pools refuse new work.

    ``threading._register_atexit`` hooks run at thread shutdown, in reverse order of
    registration, before ``concurrent.futures`` stops accepting work (it registered
    when imported, earlier than us); plain ``atexit`` would be too late.
    """
    global _exit_registered
    if _exit_registered:
        return
    _exit_registered = True
    register = getattr(threading, "_register_atexit", None)

    def drain_at_exit() -> None:
        if KernelPools.initialized():
            KernelPools.instance().drain_blocking()

    if register is not None:
        register(drain_at_exit)
    else:  # pragma: no cover - every supported Python has it
        import atexit

        atexit.register(drain_at_exit)

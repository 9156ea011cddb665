"""One kernelspec's warm kernels: started before any request, claimed by the next one.

A :class:`WarmPool` keeps up to its kernelspec's ``pool_size`` kernels started and
ready (each has answered a ``kernel_info_request`` with its own HMAC key). Everything of
a pool runs on the pools' own loop thread (:class:`PoolLoop`), so it refills in the
background for synchronous clients too. A warm kernel is a provisioner of the
kernelspec's target with a ``pool-<hex>`` kernel id; a claim hands it to the request's
provisioner (see :meth:`provisioners.lifecycle.base.ClusterProvisioner.claim_warm_kernel`).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

from ..connection.readiness import wait_until_answering
from ..loopthread import LoopThread

if TYPE_CHECKING:
    from ..lifecycle.base import ClusterProvisioner
    from ..lifecycle.engine import Engine

#: Prefix of a warm kernel's id until it is claimed.
POOL_ID_PREFIX = "pool-"


class PoolLoop(LoopThread):
    """The loop the warm-kernel pools start, check and remove their kernels on."""

    thread_name: ClassVar[str] = "kernel-pool-loop"
    _current: ClassVar[LoopThread | None] = None
    _exit_hook: ClassVar[bool] = False


def pool_key(provisioner: ClusterProvisioner) -> str:
    """What makes two provisioners' kernels interchangeable: class, kernelspec, config."""
    spec = provisioner.kernel_spec
    metadata = getattr(spec, "metadata", None) or {}
    config = (metadata.get("kernel_provisioner") or {}).get("config") or {}
    parts = (
        f"{type(provisioner).__module__}.{type(provisioner).__qualname__}",
        provisioner.spec_name,
        str(getattr(spec, "resource_dir", "") or ""),
        repr(sorted(config.items())),
        repr(list(getattr(spec, "argv", []) or [])),
        repr(sorted((getattr(spec, "env", None) or {}).items())),
    )
    return "\x00".join(parts)


class WarmPool:
    """The warm kernels of one kernelspec (as configured for one provisioner class)."""

    def __init__(self, template: ClusterProvisioner, counter: Any) -> None:
        self.key = pool_key(template)
        self.spec_name = template.spec_name
        self.target = template.target
        #: The server's log (the template provisioner's), not a module logger that
        #: Jupyter Server does not show.
        self.log = template.log
        self.size = template.pool_size
        self._cls = type(template)
        self._kernel_spec = template.kernel_spec
        self._config = template.config
        metadata = getattr(template.kernel_spec, "metadata", None) or {}
        self._spec_config = dict((metadata.get("kernel_provisioner") or {}).get("config") or {})
        self._counter = counter  # KernelPools: the cap across pools
        self.ready: collections.deque[Engine] = collections.deque()
        self.starting = 0
        self.closed = False
        #: False once a drain at a server's stop asks removals not to await their end
        self.confirm_removals = True
        self.failures = 0
        self._retry_at = 0.0
        self._starts: set[asyncio.Task[Any]] = set()
        #: removals are never cancelled (a cancelled one would leave its container or
        #: pod and port records behind); a drain waits for them
        self._removals: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ on the pool loop

    @property
    def held(self) -> int:
        """Warm kernels this pool holds or is starting."""
        return len(self.ready) + self.starting

    def fill(self) -> None:
        """Start kernels up to ``size`` (within the total cap); never blocks."""
        if self.closed:
            return
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            self._later(wait)
            return
        while (
            self.held < self.size and self._counter.room() > 0 and self._counter.starting_room() > 0
        ):
            self.starting += 1
            self._track(self._starts, self._start_one())

    async def take(self) -> Engine | None:
        """A ready warm kernel (dead ones are removed on the way); the refill starts
        ``refill_delay`` later, not during the claimed kernel's first messages."""
        found = None
        while self.ready and found is None:
            warm = self.ready.popleft()
            if await warm.poll_kernel() is None:
                found = warm
            else:
                self.log.warning(
                    "Warm %s kernel %s had exited; removing it", self.target, warm.kernel_id
                )
                self._remove(warm)
        self._later(self._counter.refill_delay)
        return found

    def give_back(self, warm: Engine) -> None:
        """Return an unclaimed warm kernel to the front of the pool."""
        if self.closed:
            self._remove(warm)
        else:
            self.ready.appendleft(warm)

    async def drain(self, *, confirm: bool = True) -> None:
        """Stop refilling; remove every warm kernel (and those still starting). Without
        ``confirm`` (a server's stop) each removal is asked for, not awaited to its end:
        what is still terminating is confirmed in the background while the process lives,
        and swept by the next server after."""
        self.closed = True
        self.confirm_removals = confirm
        starts = list(self._starts)
        for task in starts:
            task.cancel()  # a cancelled start removes what it created (shielded)
        if starts:
            await asyncio.wait(starts, timeout=60)
        kernels, self.ready = list(self.ready), collections.deque()
        for warm in kernels:
            if not confirm:
                warm.start_failed = True  # remove_kernel may then leave confirmation pending
            self._remove(warm)
        deadline = time.monotonic() + 60
        while self._removals and time.monotonic() < deadline:
            await asyncio.wait(list(self._removals), timeout=deadline - time.monotonic())

    def provisioner(self, kernel_id: str) -> ClusterProvisioner:
        """A provisioner of this pool's kernelspec and config, with no kernel manager: it
        starts one warm kernel, or removes one (never falls back to a local process)."""
        provisioner = self._cls(
            kernel_id=kernel_id,
            kernel_spec=self._kernel_spec,
            parent=None,
            config=self._config,
            **self._spec_config,
        )
        provisioner.fallback = "none"
        provisioner.engine.pool_id = kernel_id
        return provisioner

    async def _start_one(self) -> None:
        starter = None
        try:
            starter = self.provisioner(f"{POOL_ID_PREFIX}{uuid.uuid4().hex[:20]}")
            kwargs = await starter.pre_launch()
            cmd = kwargs.pop("cmd")
            await starter.launch_kernel(cmd, **kwargs)
            await starter.post_launch(**kwargs)
            await wait_until_answering(starter.connection_info, starter.launch_timeout)
            warm = starter.release_engine()
        except asyncio.CancelledError:
            if starter is not None:
                if not self.confirm_removals:  # a server's stop: never wait for a pod's end
                    starter.engine.start_failed = True
                await asyncio.shield(self._track(self._removals, self._cleanup(starter)))
            raise
        except Exception as exc:
            self.failures += 1
            delay = min(60.0, 2.0 ** min(self.failures, 6))
            self._retry_at = time.monotonic() + delay
            self.log.warning(
                "Kernel pool %r (%s): a warm kernel failed to start; retrying in %g s: %s",
                self.spec_name,
                self.target,
                delay,
                exc,
            )
            if starter is not None:
                await asyncio.shield(self._track(self._removals, self._cleanup(starter)))
        else:
            self.failures = 0
            # surplus: a kernel given back (its claim refused) while this one started
            if self.closed or len(self.ready) >= self.size:
                await asyncio.shield(self._remove(warm))
            else:
                self.ready.append(warm)
                self.log.info(
                    "Kernel pool %r (%s): warm kernel %s ready (%d of %d)",
                    self.spec_name,
                    self.target,
                    warm.kernel_id,
                    len(self.ready),
                    self.size,
                )
        finally:
            self.starting -= 1
        self._counter.fill_all()

    def _remove(self, warm: Engine) -> asyncio.Task[Any]:
        """Remove a warm kernel in a task of its own, which a drain waits for and never
        cancels."""
        holder = self.provisioner(warm.kernel_id)
        holder.take_engine(warm)
        return self._track(self._removals, self._cleanup(holder))

    async def _cleanup(self, provisioner: ClusterProvisioner) -> None:
        try:
            await provisioner.cleanup(restart=False)
        except Exception as exc:  # cleanup itself records what is left for a retry
            self.log.warning("Warm kernel %s: removal failed: %s", provisioner.kernel_id, exc)

    def _track(self, tasks: set[asyncio.Task[Any]], coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _later(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is None:
            self._timer = loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self.fill()

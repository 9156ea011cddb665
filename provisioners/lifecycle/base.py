"""The lifecycle every cluster provisioner shares, written once.

A target (local process, Docker container, SSH host, Kubernetes pod) subclasses
:class:`ClusterProvisioner` and fills in a few engine hooks: ``start_kernel``,
``kernel_address``, ``poll_kernel``, ``signal_kernel``, ``stop_kernel``,
``remove_kernel`` and the state hooks. The base allocates ports through the
cluster-aware cache, builds the connection info and the kernel's command, keeps the
kernel's environment to what it should see, applies the local fallback when the
engine cannot be reached, opens and closes SSH tunnels, keeps a kernel's address
through its restarts (:mod:`.newports`), and cleans up after partial starts, shutdowns
and restarts.

The engine hooks and their error contract are in :mod:`provisioners.lifecycle.engine`; the shared
settings in :mod:`provisioners.settings`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from jupyter_client.provisioning import KernelProvisionerBase

from .. import metrics
from ..connection import curve
from ..connection.files import PORT_NAMES, KernelConnectionInfo, json_safe, with_bytes
from ..connection.ports import LOCAL_HOST, ClusterPortCache
from ..connection.readiness import SUBSCRIBER_RECONNECT, announce_state, wait_until_answering
from ..connection.relay import KernelRelay
from ..exceptions import (
    EngineUnavailableError,
    KernelStartError,
    ProvisionerConfigError,
    ProvisionerError,
    TransportEncryptionError,
)
from ..executor import EngineExecutor
from ..loopthread import LoopThread
from ..podenv import maybe_in_pod
from ..settings import SharedSettings, is_request_input, requested_env_names
from ..usernames import check_username
from . import leftovers
from .engine import Engine
from .failed_start import as_start_error, forget_failed_start
from .fallback import fallback_env, notice_arguments, notice_text, refusal_in_pod
from .newports import keep_or_move, show_kept_ports
from .owner import ServerIdentity

if TYPE_CHECKING:
    pass

PROVISIONER_INFO_VERSION = 1
#: A warm-pool claim: serve the start (its ``pre_launch`` kwargs) with a warm kernel?
WarmClaim = Callable[["ClusterProvisioner", dict[str, Any]], Awaitable[bool]]
#: Seconds between two checks that a restarted kernel is still alive while it is probed.
_DEATH_CHECK = 0.5
#: Longest wait for an engine to release what a start that failed early opened.
_GIVE_UP_WAIT = 10.0
#: Longest wait for an engine to mark one kernel detached as its server stops.
_DETACH_WAIT = 5.0
#: Longest wait for Jupyter Server to watch a claimed or adopted kernel, and for its
#: answer to :func:`announce_state`; the pauses before each of its (at most) tries.
_ANNOUNCE_WAIT = 2.0
_ANNOUNCE_DELAYS = (0.005, 0.05, 0.2)


class ClusterProvisioner(SharedSettings, KernelProvisionerBase):  # type: ignore[misc,metaclass]
    """Base class of our provisioners: the settings and the lifecycle, over one engine."""

    #: The target's engine class; one instance runs one kernel.
    engine_class: ClassVar[type[Engine]] = Engine
    #: The local fallback's engine class, and the warm-pool claim (``(provisioner, start
    #: kwargs) -> claimed?``): plugged in by the package (``provisioners/__init__.py``),
    #: so the lifecycle imports no target and no pool.
    fallback_engine_class: ClassVar[type[Engine] | None] = None
    claim_warm_kernel: ClassVar[WarmClaim | None] = None
    #: Running kernels the next start of their kernel id adopts (:meth:`expect_adoption`).
    _adoptions: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, **kwargs: Any) -> None:
        try:
            spec_name = self._configure(dict(kwargs))
        except ProvisionerConfigError as exc:
            metrics.start_refused(exc, kwargs)
            # Raised inside the manager's start: the server must not keep the kernel.
            kernel_id = str(kwargs.get("kernel_id") or "")
            forget_failed_start(kwargs.get("parent"), kernel_id, logging.getLogger(__name__))
            raise
        self.spec_name = spec_name
        self.owner = ServerIdentity.current()
        #: The kernel's user: the start request's ``KERNEL_USERNAME`` (a shared server's
        #: access layer sets it from the request's identity), kept across restarts and
        #: adoption. "" when the request named none.
        self.username = ""
        self.resolved_secrets = {}
        #: The engine that runs this provisioner's kernel: the target's, or another one
        #: swapped in (the local fallback, a claimed warm kernel).
        self.engine: Engine = self.engine_class(self, self.kernel_id)
        self._restarting = False
        self._settle_clients = False  # a restart: clients' sockets are reconnecting
        self._shutdown_asked = False  # shutdown_requested() came first (not a kill at once)
        self._exited_before_restart = False  # an automatic restart: the kernel died first
        #: None, or the ``restart`` flag of a removal that failed and is to be retried.
        self._pending_removal: bool | None = None
        self._removal_error = ""
        self._stopped = False
        self._teardown_lock = asyncio.Lock()
        self._claimed = False
        self._given_up_cleanup: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None  # held until done
        #: A restart failed because the engine was unreachable: the kernel keeps its
        #: address and counts as exited, so the manager's restarter starts it again.
        self._awaiting_engine = False
        self._restart_launch = False  # the coming launch_kernel is a restart's

    @property
    def executor(self) -> EngineExecutor:
        """The thread pool of the engine that runs the kernel."""
        return self.engine.executor

    @property
    def pool_id(self) -> str:
        """A warm kernel's ``pool-...`` id until it is claimed ('' for any other kernel)."""
        return self.engine.pool_id

    def progress(self, step: str, detail: str = "") -> None:
        """Report a step of the start (see :meth:`Engine.progress`)."""
        self.engine.progress(step, detail)

    # ------------------------------------------------------------------ lifecycle

    @property
    def has_process(self) -> bool:
        return not self._stopped and (self.engine.has_kernel() or self._awaiting_engine)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Pick the engine, allocate ports, build connection info, command and env."""
        metrics.start_begun(
            self, restart=self._restarting, adopting=self.kernel_id in self._adoptions
        )
        try:
            return await self._pre_launch(**kwargs)
        except BaseException as exc:
            metrics.start_ended(self, exc)
            if not self.engine.has_kernel():
                await self._give_up_start()
            if not isinstance(exc, Exception):
                raise
            error = self._start_failed(exc)
            if error is exc:
                raise
            raise error from exc

    async def _give_up_start(self) -> None:
        """Let the engine release what a start that failed early opened; bounded, so that
        the start's error is reported even when the engine does not answer."""
        try:
            await asyncio.wait_for(asyncio.shield(self.engine.start_given_up()), _GIVE_UP_WAIT)
        except asyncio.TimeoutError:
            self.log.warning(
                "Kernel %s: the %s engine did not release the failed start's session within %g s",
                self.kernel_id,
                self.engine.target,
                _GIVE_UP_WAIT,
            )

    async def _pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        start_clock = time.monotonic()
        engine = self.engine
        if self._restarting:
            # Before any await: the kernel manager zeroed its ports for newports=True.
            show_kept_ports(self)
            kept = list(engine.ports)
            if self._pending_removal is None:  # else the old kernel holds them until removed
                tunneled = engine.tunnels is not None and not engine.fallback_for
                engine.ports = await keep_or_move(self, tunneled)
            # a port moved: clients connect anew; after the kernel's own death no client
            # waits for the restart to return (see _let_clients_reconnect)
            self._settle_clients = engine.ports == kept and not self._exited_before_restart
            self._restart_launch = True
        else:
            # a NUL (no environment can hold one) is refused here, on every target
            self.username = check_username(
                str((kwargs.get("env") or {}).get("KERNEL_USERNAME") or "")
            )
            adopted = ClusterProvisioner._adoptions.pop(self.kernel_id, None)
            if adopted is not None:
                await self._adopt(adopted)
                kwargs["cmd"] = list(self.command or self.kernel_spec.argv)
                return await super().pre_launch(**kwargs)
            self.apply_launch_parameters(kwargs.get("env"))  # before a warm kernel is claimed
            claim = type(self).claim_warm_kernel
            if claim is not None and await claim(self, kwargs):
                kwargs["cmd"] = list(self.command or self.kernel_spec.argv)
                return await super().pre_launch(**kwargs)
            engine = self.engine = await self._select_engine()
        engine.start_clock = start_clock
        leftovers.hurry()  # what earlier cleanups left is retried now
        self._restarting = False
        self._exited_before_restart = self._shutdown_asked = False
        self._stopped = False
        if not engine.ports and engine.needs_ports():
            engine.port_host = engine.allocation_host()
            engine.ports = await engine.executor.run_or_undo(  # a cancel returns the ports
                lambda _: ClusterPortCache.instance().release(engine.allocation_owner),
                ClusterPortCache.instance().allocate,
                self.kernel_ports,
                engine.allocation_owner,
                host=engine.port_host,
                port_range=self.port_range,
                sources=engine.port_sources(),
                fields={"kernelspec": self.spec_name, "target": engine.target},
            )
        try:
            engine.curve_keys = self.select_curve_keys()
            engine.kernel_info = self._build_kernel_info(engine)
            extra_arguments = list(kwargs.pop("extra_arguments", []))
            if engine.fallback_for:
                argv = list(self.command or self.kernel_spec.argv)
                notice = notice_text(self.target, engine.fallback_cause)
                extra_arguments += notice_arguments(argv, notice)
            kwargs["cmd"] = await engine.prepare_command(engine.kernel_info, extra_arguments)
            requested = requested_env_names(kwargs.get("env"))
            kwargs = await super().pre_launch(**kwargs)
            kwargs["env"] = self._kernel_env(kwargs.get("env", {}), engine, requested)
            if self.username:  # a restart of an adopted kernel: its start request is gone
                kwargs["env"].setdefault("KERNEL_USERNAME", self.username)
        except BaseException:
            self._release_ports()
            raise
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel through the engine and return how the client reaches it."""
        engine = self.engine
        if self._claimed:  # a warm kernel, running and answering since before the request
            self._claimed = False
            metrics.start_ended(self)
            self._announce_when_watched()
            return self.connection_info
        env = kwargs.pop("env", {})
        restarting, self._restart_launch = self._restart_launch, False
        # a restart after a failed removal: the previous kernel must go first
        if self._pending_removal is not None and not await self.retry_removal():
            msg = (
                f"cannot start {engine.target} kernel {self.kernel_id}: what its previous "
                f"start left could not be removed yet: {self._removal_error}"
            )
            if restarting:
                msg += self._await_engine()
            raise KernelStartError(msg, target=engine.target, kernel_id=self.kernel_id)
        try:
            engine.progress("starting", f"on the {engine.target} engine")
            await asyncio.wait_for(
                engine.start_kernel(cmd, env, dict(engine.kernel_info), **kwargs),
                timeout=self.launch_timeout,
            )
            self.connection_info = await self._connect()
            if engine.curve_keys is not None:
                await self._confirm_encryption()
            if self._settle_clients:
                self._settle_clients = False
                await self._let_clients_reconnect()
            engine.progress("ready", "the kernel's channels are reachable")
            if self._awaiting_engine:
                self._awaiting_engine = False
                self.log.info("Kernel %s: the engine answers again; restarted", self.kernel_id)
        except BaseException as exc:
            metrics.start_ended(self, exc)
            engine_down = restarting and isinstance(exc, EngineUnavailableError)
            if not (engine_down and self._awaiting_engine):  # said once while it is down
                self.log.warning(
                    "Kernel %s (%s): start failed, removing what was created: %s",
                    self.kernel_id,
                    engine.target,
                    _describe(exc),
                )
            engine.start_failed = True  # the error is reported before the removal is done
            await self._teardown(restart=engine_down)  # a restart keeps the address
            if engine_down:
                msg = f"cannot restart {engine.target} kernel {self.kernel_id}: {exc}"
                msg += self._await_engine()
                raise EngineUnavailableError(
                    msg, target=engine.target, kernel_id=self.kernel_id
                ) from exc
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, asyncio.TimeoutError):
                msg = (
                    f"{engine.target} kernel {self.kernel_id} did not start within "
                    f"launch_timeout={self.launch_timeout:g} s"
                )
                error = ProvisionerError(msg, target=engine.target, kernel_id=self.kernel_id)
                raise self._start_failed(error) from exc
            error = self._start_failed(exc)
            if error is exc:
                raise
            raise error from exc
        metrics.start_ended(self)
        return self.connection_info

    def _await_engine(self) -> str:
        """A restart failed on an unreachable engine: keep the kernel (its ports, tunnels
        and relays, so open websockets keep their address), let it count as exited, and
        let the manager's restarter start it again until the engine answers. Returns what
        the error adds for the person who asked."""
        self._awaiting_engine = True
        km: Any = self.parent
        if getattr(km, "autorestart", False) and hasattr(km, "start_restarter"):
            km.start_restarter()  # jupyter_client stopped it for the restart
            return (
                "; the kernel keeps its address and its restarter starts it again once "
                "the engine answers (or restart it then)"
            )
        return "; restart the kernel once the engine answers"

    async def post_launch(self, **kwargs: Any) -> None:
        """Hear from the manager's restarter when it gives up on the kernel (its restarts
        kept failing): then nothing of the kernel may stay behind (see :meth:`_given_up`)."""
        await super().post_launch(**kwargs)
        km: Any = self.parent
        if hasattr(km, "add_restart_callback"):  # once: a restart launches again
            km.remove_restart_callback(self._given_up, "dead")
            km.add_restart_callback(self._given_up, "dead")

    def _given_up(self) -> None:
        """The restarter's 'dead' callback: Jupyter Server drops the kernel from its map and
        never cleans it up, so remove its container, pod or process, its port records and
        its connection file now (on the restarter's loop)."""
        self.log.warning(
            "Kernel %s: the restarter gave up on it; removing what is left of it",
            self.kernel_id,
        )
        task = asyncio.get_running_loop().create_task(self._remove_given_up())
        self._given_up_cleanup = task  # held until done

    async def _remove_given_up(self) -> None:
        await self.cleanup(restart=False)
        km: Any = self.parent
        if hasattr(km, "cleanup_connection_file"):
            km.cleanup_connection_file()

    async def poll(self) -> int | None:
        if not self.has_process:
            return 0
        if self._awaiting_engine and not self.engine.has_kernel():
            return 1  # its restart failed on the engine: the restarter tries again
        return await self.engine.poll_kernel()

    async def wait(self) -> int | None:
        while True:
            status = await self.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.1)

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel; best-effort: an engine error is logged, never raised."""
        if not self.has_process:
            return
        if signum == signal.SIGKILL:
            await self.kill(restart=self._restarting)
            return
        await self._best_effort(f"signal {signum}", self.engine.signal_kernel(signum))

    async def kill(self, restart: bool = False) -> None:
        """Kill the kernel; best-effort: an engine error is logged, the shutdown goes on.

        A kill without a shutdown request, of a kernel that already exited, is
        jupyter_client's restarter restarting a kernel that died by itself (jupyter_client
        passes no ``restart`` flag here).
        """
        if not self._shutdown_asked:
            self._exited_before_restart = await self.poll() is not None
        if self.has_process:
            await self._best_effort("kill", self.engine.stop_kernel(force=True))

    async def terminate(self, restart: bool = False) -> None:
        """Terminate the kernel; best-effort, as :meth:`kill`."""
        if self.has_process:
            await self._best_effort("terminate", self.engine.stop_kernel(force=False))

    async def shutdown_requested(self, restart: bool = False) -> None:
        # jupyter_client does not pass restart=True on to terminate()/kill(): remember it.
        self._restarting = restart
        self._shutdown_asked = True
        self.engine.shutdown_coming()

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the kernel's resources; never raises for an engine error.

        Idempotent. What could not be removed stays recorded, with its port records,
        and is retried (see :mod:`.leftovers`) until it is gone.
        """
        await self._teardown(restart=restart)
        metrics.kernel_gone(self, restart=restart)
        self._restarting = restart

    def resolve_path(self, path_str: str) -> str | None:
        """``path_str`` as the kernel sees it, resolved to an existing file of this server.

        A local kernel (or the local fallback) resolves it as jupyter_client's
        LocalProvisioner does: ``~`` expanded, relative to the kernel's working directory,
        None unless the file exists. A remote kernel's path names a file of its
        container, pod or host, which the server cannot open: None, except where the
        target maps it onto a server file (Docker bind mounts of a local daemon).
        """
        return self.engine.server_path(path_str)

    async def retry_removal(self) -> bool:
        """Retry a removal that failed; True once nothing of the kernel is left."""
        if self._pending_removal is not None:
            await self._teardown(self._pending_removal, retry=True)
        return self._pending_removal is None

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        """This provisioner's ``shutdown_wait_time`` if set, else jupyter_client's value."""
        if self.shutdown_wait_time is None:
            return recommended
        return max(0.0, float(self.shutdown_wait_time))

    async def get_provisioner_info(self) -> dict[str, Any]:
        """JSON-safe, versioned state (the HMAC key as text) for reconnecting later."""
        info = await super().get_provisioner_info()
        connection = json_safe(dict(self.connection_info))
        engine = self.engine
        info.update(
            {
                "version": PROVISIONER_INFO_VERSION,
                "target": self.target,
                "runner": engine.target,
                "fallback_cause": engine.fallback_cause,
                "connection_info": connection,
                "kernel_info": json_safe(engine.kernel_info),
                "ports": list(engine.ports),
                "port_host": engine.port_host,
                "state": engine.kernel_state(),
                "username": self.username,
                "launch_env": self.launch_parameters.env() if self.launch_parameters else {},
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Restore :meth:`get_provisioner_info`: build the engine from the saved state and
        reattach it to the running kernel."""
        version = provisioner_info.get("version")
        if version != PROVISIONER_INFO_VERSION:
            msg = f"unsupported provisioner info version {version!r}"
            raise ProvisionerError(msg, target=self.target)
        await super().load_provisioner_info(provisioner_info)
        self.username = str(provisioner_info.get("username") or "")
        self.restore_launch_parameters(provisioner_info.get("launch_env"))
        connection = with_bytes(provisioner_info["connection_info"])
        if provisioner_info.get("runner", self.target) != self.target:
            engine = self._local_fallback(provisioner_info.get("fallback_cause", ""))
        else:
            engine = self.engine_class(self, self.kernel_id)
        engine.kernel_info = with_bytes(provisioner_info.get("kernel_info", {}))
        public, secret = (engine.kernel_info.get(k) for k in curve.CURVE_KEYS)
        if isinstance(public, bytes) and isinstance(secret, bytes):
            engine.curve_keys = public, secret
        engine.ports = list(provisioner_info.get("ports", []))
        engine.port_host = provisioner_info.get("port_host", LOCAL_HOST)
        await engine.load_kernel_state(provisioner_info.get("state", {}))
        self.engine = engine
        if engine.has_kernel():
            await self._adopt_ports()
            self.connection_info = await self._connect()
        else:
            self.connection_info = cast(KernelConnectionInfo, connection)

    # ------------------------------------------------------------------ persistence

    @property
    def persists(self) -> bool:
        """True when the kernel outlives this server (``persist_kernels``, on an engine
        whose kernels can; never a local process, nor the local fallback)."""
        return (
            self.persist_kernels
            and self.engine.persists
            and not self.engine.fallback_for
            and not self.engine.pool_id
        )

    async def detach(self) -> bool:
        """This server stops and the kernel lives on: close its SSH tunnels, mark it
        detached on the engine (:meth:`Engine.detach_kernel`) and forget it, without
        stopping or removing it. Its port records stay for the adopting server. Returns
        False (and does nothing) for a kernel that does not persist; never raises for an
        engine error (logged: the kernel is then adopted, or swept, as a gone server's).
        """
        engine = self.engine
        if self._stopped or not engine.has_kernel() or not self.persists:
            return False
        async with self._teardown_lock:
            self._stopped = True
            if engine.tunnels is not None:
                tunnels, engine.tunnels = engine.tunnels, None
                await self._best_effort("closing the SSH tunnels", tunnels.close())
            await self._best_effort(
                "detaching", asyncio.wait_for(engine.detach_kernel(), _DETACH_WAIT)
            )
        self.log.info(
            "Kernel %s: detached; it runs on in its %s for the next server to adopt",
            self.kernel_id,
            engine.target,
        )
        return True

    @staticmethod
    def expect_adoption(info: dict[str, Any]) -> None:
        """Let the manager's next start of kernel ``info["kernel_id"]`` adopt the running
        kernel ``info`` describes (a provisioner info, from :meth:`adoptable_kernels`)
        instead of starting one: the server then registers it as it registers any kernel
        it starts (``MappingKernelManager.start_kernel(kernel_id=...)``)."""
        ClusterProvisioner._adoptions[info["kernel_id"]] = info

    @staticmethod
    def forget_adoption(kernel_id: str) -> None:
        """Drop an expected adoption that no start took."""
        ClusterProvisioner._adoptions.pop(kernel_id, None)

    async def _adopt(self, info: dict[str, Any]) -> None:
        """Serve this start with the running kernel ``info`` describes (see
        :meth:`expect_adoption`); raises :class:`ProvisionerError` when it is gone."""
        await self.load_provisioner_info(info)
        if not self.engine.has_kernel():
            await self._teardown(restart=False)
            msg = f"kernel {self.kernel_id} is gone from its {self.engine.target} engine"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id)
        km: Any = self.parent
        if hasattr(km, "load_connection_info"):
            # jupyter_client trusts a matching connection file left by the dead server
            # and would then compare it with the manager's own (new) key: load it first.
            km.load_connection_info(dict(self.connection_info))
        self._serve_running_kernel()

    async def adoptable_kernels(self) -> list[dict[str, Any]]:
        """The kernels of this kernelspec that a stopped or dead server left for adoption
        (:meth:`Engine.adoptable_kernels`), each as the provisioner info that
        :meth:`load_provisioner_info` takes, with its ``kernel_id``. Nothing unless
        ``persist_kernels`` is on. Raises :class:`EngineUnavailableError` when the engine
        cannot be reached."""
        if not self.persist_kernels or not self.engine.persists:
            return []
        found = []
        for record in await self.engine.adoptable_kernels():
            kernel_info = dict(record["kernel_info"])
            found.append(
                {
                    "kernel_id": record["kernel_id"],
                    "version": PROVISIONER_INFO_VERSION,
                    "target": self.target,
                    "runner": self.engine.target,
                    "fallback_cause": "",
                    "connection_info": {},
                    "kernel_info": kernel_info,
                    "ports": list(record.get("ports") or []),
                    "port_host": record.get("port_host", LOCAL_HOST),
                    "state": dict(record.get("state") or {}),
                    "username": str(record.get("username") or ""),
                    "launch_env": dict(record.get("launch_env") or {}),
                }
            )
        return found

    # ------------------------------------------------------------------ maintenance

    async def check_engine(self) -> None:
        """Raise :class:`EngineUnavailableError` when the target's engine cannot be reached."""
        await self.engine.check_engine()

    async def preflight(self) -> list[str]:
        """Warnings about this kernelspec's engine (see :meth:`Engine.preflight`)."""
        return await self.engine.preflight()

    async def sweep_orphans(self) -> list[str]:
        """Remove what kernels of dead servers left on the target's engine."""
        return await self.engine.sweep_orphans()

    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernels the target's engine knows of."""
        return await self.engine.list_kernels()

    # ------------------------------------------------------------------ other engines

    def take_engine(self, engine: Engine) -> None:
        """Run ``engine``'s kernel as this provisioner's (a claimed warm kernel, already
        renamed to this kernel's id; or one to remove): its ports, connection info, keys
        and tunnels come with it."""
        engine.settings = self
        engine.kernel_id = self.kernel_id
        self.engine = engine
        self.connection_info = cast(KernelConnectionInfo, dict(engine.connection_info))
        self._stopped = False

    def claim_warm_engine(self, engine: Engine) -> None:
        """Serve this start with the claimed warm kernel ``engine``."""
        self.take_engine(engine)
        self._serve_running_kernel()

    def _serve_running_kernel(self) -> None:
        """The coming launch returns the running kernel's connection info as it is (a
        claimed warm kernel, an adopted one); the manager gets its Curve keys."""
        self._claimed = True
        km: Any = self.parent
        keys = self.engine.curve_keys
        if keys is not None and hasattr(km, "curve_publickey"):
            km.curve_publickey, km.curve_secretkey = keys

    def _announce_when_watched(self) -> None:
        """Jupyter Server reports a kernel as 'starting' until the iopub watcher it opens
        after a start sees a status, and a new websocket waits for that (it polls every
        50 ms). A claimed or adopted kernel published its start long before: once the
        watcher is there, a claimed warm kernel is reported idle (it answered its warm
        check and nobody has used it since), and an adopted one, which may be busy, is
        asked to publish its state (:func:`announce_state`)."""
        km: Any = self.parent
        if km is None or not hasattr(km, "execution_state"):
            return  # a manager without a watcher (jupyter_client's own, nbclient)
        claimed = bool(self.engine.claimed_from)
        self._announcing = asyncio.get_running_loop().create_task(self._announce(km, claimed))

    async def _announce(self, km: Any, claimed: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ANNOUNCE_WAIT
        while km.execution_state != "starting":  # set as the watcher starts
            if loop.time() > deadline or self._stopped:
                return
            await asyncio.sleep(0.002)
        if claimed:
            km.execution_state = "idle"
            return
        for delay in _ANNOUNCE_DELAYS:  # its subscription reaches the kernel meanwhile
            await asyncio.sleep(delay)
            if km.execution_state != "starting" or self._stopped:
                return
            try:
                await announce_state(dict(self.connection_info), _ANNOUNCE_WAIT)
            except Exception as exc:  # only a faster first websocket is lost
                self.log.debug("Kernel %s: asking for its state failed: %s", self.kernel_id, exc)
                return

    def release_engine(self) -> Engine:
        """Hand this provisioner's engine (a started warm kernel) over; the provisioner is
        left with a fresh one and forgets the kernel."""
        engine = self.engine
        engine.connection_info = dict(self.connection_info)
        self.engine = self.engine_class(self, self.kernel_id)
        self._stopped = True
        return engine

    # ------------------------------------------------------------------ internals

    def kernel_relay(
        self,
        executor: EngineExecutor,
        connect_timeout: float,
        loop_thread: type[LoopThread] | None = None,
    ) -> KernelRelay:
        """Local listeners that keep this kernel's client address through its restarts,
        for a target reached on an address that a restart changes (a container's or a
        pod's IP); on ``loop_thread``, or on the engine's own loop when None."""
        return KernelRelay(
            PORT_NAMES,
            kernel_id=self.kernel_id,
            target=self.target,
            loop_thread=loop_thread,
            executor=executor,
            owner=f"relay-{self.kernel_id}-{uuid.uuid4().hex[:8]}",
            port_range=self.port_range,
            connect_timeout=connect_timeout,
            what=f"the relay of kernel {self.kernel_id}",
            logger=self.log,
        )

    @property
    def allocation_owner(self) -> str:
        """The port cache owner of this kernel's ports."""
        return self.engine.allocation_owner

    @property
    def curve_keys(self) -> tuple[bytes, bytes] | None:
        """The kernel's CurveZMQ keypair, or None for plain ZMTP."""
        return self.engine.curve_keys

    async def _adopt_ports(self) -> None:
        """Hold the reattached kernel's port records (and its pid) from this process on.

        Its former server may be gone: records left in that server's name would be
        reclaimed by the next allocation on this machine, killing a local kernel and
        deleting its connection file.
        """
        engine = self.engine
        if not engine.ports:
            return
        conflicts = await engine.executor.run(
            ClusterPortCache.instance().adopt,
            engine.port_host,
            engine.allocation_owner,
            engine.ports,
            **engine.port_record_fields(),
        )
        if conflicts:
            self.log.warning(
                "Kernel %s: ports %s on %s are recorded for another kernel",
                self.kernel_id,
                conflicts,
                engine.port_host,
            )

    def _start_failed(self, exc: Exception) -> ProvisionerError:
        """Our named error for a failed start; the failed kernel leaves the server's map."""
        error = as_start_error(exc, target=self.engine.target, kernel_id=self.kernel_id)
        forget_failed_start(self.parent, self.kernel_id, self.log)
        return error

    async def _select_engine(self) -> Engine:
        """The target's engine, or the local fallback when the target's is unreachable."""
        try:
            await self.engine.check_engine()
        except EngineUnavailableError as exc:
            if self.fallback != "local":
                raise
            if maybe_in_pod() and not self.fallback_in_pod:
                msg = refusal_in_pod(self.target, str(exc))
                raise EngineUnavailableError(
                    msg, target=self.target, kernel_id=self.kernel_id
                ) from exc
            self.log.warning(
                "Kernel %s: the %s engine is unreachable (%s); starting the kernel locally "
                "(fallback = 'local')",
                self.kernel_id,
                self.target,
                exc,
            )
            await self._give_up_start()
            return self._local_fallback(str(exc))
        return self.engine

    def _local_fallback(self, cause: str) -> Engine:
        """The local fallback's engine, with this target's settings (its environment
        policy, its port range), never the local target's."""
        engine_class = self.fallback_engine_class
        if engine_class is None:
            msg = "no local fallback engine is plugged in (import provisioners)"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id)
        engine = engine_class(self, self.kernel_id)
        engine.fallback_for = self.target
        engine.fallback_cause = cause
        return engine

    def _build_kernel_info(self, engine: Engine) -> dict[str, Any]:
        session = getattr(self.parent, "session", None)
        key = getattr(session, "key", None) or str(uuid.uuid4()).encode()
        scheme = getattr(session, "signature_scheme", "hmac-sha256")
        info: dict[str, Any] = {
            "transport": getattr(self.parent, "transport", "tcp"),
            "ip": engine.kernel_bind_ip(),
            "key": key,
            "signature_scheme": scheme,
            "kernel_name": getattr(self.kernel_spec, "name", "") or "",
        }
        info.update(dict(zip(PORT_NAMES, engine.ports or [0] * 5, strict=True)))
        if engine.curve_keys is not None:
            info.update(zip(curve.CURVE_KEYS, engine.curve_keys, strict=True))
        return info

    def select_curve_keys(self) -> tuple[bytes, bytes] | None:
        """The CurveZMQ keypair for the kernel (set on the manager too), or None."""
        try:
            return curve.select_keys(self.parent, self.kernel_spec, self.transport_encryption)
        except TransportEncryptionError as exc:
            msg = f"kernelspec {self.spec_name!r}: {exc}"
            raise TransportEncryptionError(
                msg, target=self.target, kernel_id=self.kernel_id
            ) from None

    async def _let_clients_reconnect(self) -> None:
        """A restart on the same ports: the clients' sockets reconnect by themselves, and
        Jupyter Server reports a restart done once the provisioner has launched the kernel.
        What the kernel publishes before a client's subscription reaches it is lost (the
        reply to a request sent at once came without its output or idle status). So wait
        until the kernel answers on shell and iopub, then for a subscriber's reconnect
        interval, then for the engine's own settling (:meth:`EngineHooks.settle_clients`).

        Not after the kernel died by itself: jupyter_client's restarter tells clients
        nothing when its restart is done (they ask until the kernel answers), and
        jupyter_client fails a shutdown requested while a restart is pending (Jupyter
        Server: HTTP 500), which a client that already got its answer may well send."""
        left = max(1.0, self.launch_timeout - (time.monotonic() - self.engine.start_clock))
        probe = asyncio.ensure_future(wait_until_answering(self.connection_info, left))
        try:
            while not (await asyncio.wait({probe}, timeout=_DEATH_CHECK))[0]:
                if await self.engine.poll_kernel() is not None:
                    return  # it died: the kernel's restarter, not its clients, comes next
            probe.result()
        except Exception as exc:  # the restart stands; a client may wait for a status
            self.log.warning(
                "Kernel %s: restarted, but clients may miss its first messages: %s",
                self.kernel_id,
                _describe(exc),
            )
        else:
            await asyncio.sleep(SUBSCRIBER_RECONNECT)
        finally:
            if not probe.done():
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
        await self.engine.settle_clients()

    async def _confirm_encryption(self) -> None:
        """Fail the start unless the kernel completes a Curve handshake (ipykernel >= 7.4)."""
        keys = self.engine.curve_keys
        assert keys is not None
        runner = self.engine.target
        problem = await curve.confirm_curve(self.connection_info, keys[0], self.launch_timeout)
        if problem:
            msg = f"{runner} kernel {self.kernel_id} {problem}"
            raise TransportEncryptionError(msg, target=runner, kernel_id=self.kernel_id)
        self.log.debug("Kernel %s: channels encrypted with CurveZMQ", self.kernel_id)

    def _kernel_env(
        self, env: dict[str, str], engine: Engine, requested: set[str]
    ) -> dict[str, str]:
        """Keep the server's environment out of a remote kernel's (unless configured).

        ``KERNEL_*`` and ``JPY_SESSION_NAME`` are taken from the start request only
        (``requested``), never from the server's own environment.
        """
        if not self.inherit_server_env:
            spec_env = set(getattr(self.kernel_spec, "env", {}) or {})
            env = {
                k: v
                for k, v in env.items()
                if k in spec_env or (k in requested and is_request_input(k))
            }
            if engine.fallback_for:
                env = fallback_env(env)
        env.update(self.env)
        return env

    async def _connect(self) -> KernelConnectionInfo:
        """Client-side connection info: direct, or through SSH tunnels."""
        engine = self.engine
        ip, ports = await engine.kernel_address()
        if self.ssh_server and not engine.fallback_for:  # never to the local fallback
            from ..connection.tunnels import KernelTunnels

            if engine.tunnels is None:
                engine.tunnels = KernelTunnels.from_provisioner(self)
            ip, ports = "127.0.0.1", await engine.tunnels.open(ip, ports)
            engine.progress("tunnels open", f"through {self.ssh_server}")
        info = dict(engine.kernel_info)
        info.update(ports)
        info["ip"] = ip
        for name in curve.CURVE_KEYS:  # text, as KernelManager.get_connection_info has them
            if isinstance(info.get(name), bytes):
                info[name] = info[name].decode()
        return cast(KernelConnectionInfo, info)

    async def _best_effort(self, action: str, call: Awaitable[None]) -> None:
        """Await an engine hook of a shutdown; log its failure with the cause and go on."""
        try:
            await call
        except Exception as exc:
            self.log.warning(
                "Kernel %s: %s failed on the %s engine; going on: %s",
                self.kernel_id,
                action,
                self.engine.target,
                _describe(exc),
            )

    async def _teardown(self, restart: bool, retry: bool = False) -> None:
        """Remove engine resources; on a full stop, close tunnels and return ports too.

        A restart keeps the tunnels: reopening them retargets the same local ports, so
        clients connected before the restart keep working. A removal that fails keeps
        the ports and records the kernel for a retry (:mod:`.leftovers`).
        """
        async with self._teardown_lock:
            if self._pending_removal is False:
                restart = False  # a full stop pending stays a full stop
            if not restart:
                self._stopped = True
                self._awaiting_engine = False
                if self.engine.tunnels is not None:
                    tunnels, self.engine.tunnels = self.engine.tunnels, None
                    await self._best_effort("closing the SSH tunnels", tunnels.close())
            try:
                await self.engine.remove_kernel(restart)
            except BaseException as exc:
                confirming = isinstance(exc, leftovers.RemovalPending)
                if confirming and not retry:
                    self.log.info(
                        "Kernel %s: removal requested from the %s engine; its confirmation "
                        "is awaited in the background: %s",
                        self.kernel_id,
                        self.engine.target,
                        exc,
                    )
                elif not confirming and (self._pending_removal is None or not retry):
                    self.log.warning(
                        "Kernel %s: removing it from the %s engine failed; kept, with its "
                        "ports, for a retry every %g s: %s",
                        self.kernel_id,
                        self.engine.target,
                        self.cleanup_retry_interval,
                        _describe(exc),
                    )
                self._pending_removal, self._removal_error = restart, _describe(exc)
                leftovers.record(self, leftovers.CONFIRM_INTERVAL if confirming else None)
                if not isinstance(exc, Exception):
                    raise
                return
            if self._pending_removal is not None:
                self.log.info("Kernel %s: what was left is now removed", self.kernel_id)
            self._pending_removal, self._removal_error = None, ""
            leftovers.discard(self)
            if not restart:
                self._release_ports()

    def _release_ports(self) -> None:
        if self.engine.ports:
            ClusterPortCache.instance().release(self.engine.allocation_owner)
            self.engine.ports = []


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

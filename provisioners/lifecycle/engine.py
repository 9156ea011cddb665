"""The engine of one kernel: its state on its target, and the hooks the lifecycle calls.

A target's engine class (``LocalEngine``, ``DockerEngine``, ``SSHEngine``,
``PodEngine``) subclasses :class:`Engine`. One engine object runs one kernel: the
provisioner holds it as ``provisioner.engine`` and swaps it for another when the kernel
comes from elsewhere (a local fallback, a claimed warm kernel, state saved by another
server). Its settings are the provisioner's (``engine.settings``, read only).

Error contract of the hooks: ``check_engine`` and ``start_kernel`` raise named errors
that fail the start; ``poll_kernel`` never raises for an engine error (None: unknown).
``signal_kernel``, ``stop_kernel`` and ``remove_kernel`` may raise when the engine refuses
or cannot be reached: interrupt, terminate and kill are best-effort (the lifecycle logs
the cause and the shutdown goes on), and a failed removal keeps the kernel, its resources
and its port records recorded (:mod:`.leftovers`) until a retry succeeds. The lifecycle
that calls them lives once, in :class:`provisioners.lifecycle.base.ClusterProvisioner`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

from ..connection.files import PORT_NAMES
from ..connection.ports import LOCAL_HOST, PortSource
from ..executor import EngineExecutor
from ..progress import ProgressStep, log_step

if TYPE_CHECKING:
    from ..connection.tunnels import KernelTunnels
    from .base import ClusterProvisioner

__all__ = ["PORT_NAMES", "Engine", "kernel_row"]


class Engine:
    """One kernel on one engine; the defaults suit a kernel on this machine.

    The lifecycle owns the kernel's record fields (``ports``, ``kernel_info``,
    ``curve_keys``, ``tunnels``, ``connection_info``) and sets them; the target's hooks
    read them and keep their own engine state (a container, a pod, a remote pid).
    """

    #: Short engine name used in logs, errors, labels and the CLI.
    target: ClassVar[str] = "base"
    #: Whether this engine's kernels can outlive their server (``persist_kernels``).
    persists: ClassVar[bool] = True
    #: The engine's own bounded thread pool: every blocking call of this engine (and the
    #: port allocation for its host) runs there, never in asyncio's default one.
    executor: ClassVar[EngineExecutor] = EngineExecutor("base", max_workers=4)

    def __init__(self, settings: ClusterProvisioner, kernel_id: str) -> None:
        #: The provisioner whose settings configure this engine (read only).
        self.settings = settings
        self.kernel_id = kernel_id
        #: A warm kernel's ``pool-...`` id until it is claimed ('' for any other kernel).
        self.pool_id = ""
        #: The ``pool-...`` id a claimed warm kernel was started under ('' otherwise).
        self.claimed_from = ""
        #: The host the kernel's ports are allocated on, and the ports (empty before a start).
        self.port_host = LOCAL_HOST
        self.ports: list[int] = []
        #: The kernel's own connection info (its bind IP and ports, key, Curve keys).
        self.kernel_info: dict[str, Any] = {}
        #: The client's connection info (direct, relayed or tunneled).
        self.connection_info: dict[str, Any] = {}
        self.curve_keys: tuple[bytes, bytes] | None = None
        self.tunnels: KernelTunnels | None = None
        #: On a local fallback engine: the target it replaces, and why.
        self.fallback_for = ""
        self.fallback_cause = ""
        #: Set by the lifecycle before it removes what a failed start created, so that the
        #: start's error is reported at once (and by a pool drained as its server stops):
        #: ``remove_kernel`` then need not wait for the engine to finish (it may raise
        #: ``RemovalPending``). The hook clears it.
        self.start_failed = False
        self.started = False
        self.start_clock = time.monotonic()

    # ------------------------------------------------------------------ shared helpers

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        """The server's log (the settings' one)."""
        return self.settings.log

    @property
    def kernel_spec(self) -> Any:
        return self.settings.kernel_spec

    @property
    def manager(self) -> Any:
        """The kernel manager of the kernel (None for a warm kernel not yet claimed)."""
        return self.settings.parent

    @property
    def allocation_owner(self) -> str:
        """The port cache owner of this kernel's ports."""
        return f"kernel-{self.kernel_id}"

    def progress(self, step: str, detail: str = "") -> None:
        """Report a step of the start: INFO in the server's log, live in ``run``.

        ``detail`` is the engine's own words (an event message, pull progress); it must
        never hold connection info.
        """
        elapsed = time.monotonic() - self.start_clock
        log_step(self.log, ProgressStep(self.kernel_id, self.target, step, detail, elapsed))

    # ------------------------------------------------------------------ hooks

    async def check_engine(self) -> None:
        """Raise :class:`EngineUnavailableError` when the engine cannot be reached.

        That error (and only that one) allows the local fallback; any other
        :class:`ProvisionerError` fails the start.
        """

    async def preflight(self) -> list[str]:
        """Check what can be checked without starting anything (used by ``kernelspec
        install``); return warnings that name the fix. Never raises for an engine
        problem: an unreachable engine is a warning too."""
        return []

    def allocation_host(self) -> str:
        """The host whose ports the kernel's ports are allocated on (recorded as
        :attr:`port_host` when they are)."""
        return LOCAL_HOST

    def port_sources(self) -> list[PortSource]:
        """Engine records of ports in use on :meth:`port_host` (labels, annotations...)."""
        return []

    def needs_ports(self) -> bool:
        """False where the kernel needs no allocated TCP ports (e.g. ipc transport)."""
        return True

    def reached_on_own_ports(self) -> bool:
        """True when a client reaches the kernel on its allocated ports, at an address
        that a restart keeps (so the restarted kernel's address is known before it starts).
        """
        return False

    def binds_ports_here(self) -> bool:
        """True when the kernel, or the engine's proxy for it, binds its allocated ports
        on this machine (so a restart bind-tests them here before keeping them); False
        where they are bound elsewhere (a pod, a container's own network, a remote host)
        or behind listeners this server keeps through a restart (a port-forward).
        Default: published here and reached on them. Never raises."""
        return self.allocation_host() == LOCAL_HOST and self.reached_on_own_ports()

    def server_path(self, path: str) -> str | None:
        """``path`` as the kernel sees it, as an existing file of this server, or None.

        A remote kernel's files are not the server's: None unless a target can map them.
        """
        return None

    def kernel_bind_ip(self) -> str:
        """The IP the kernel binds, as written in its own connection file."""
        return "127.0.0.1"

    def kernel_connection_file(self) -> str:
        """Path of the connection file as the kernel sees it."""
        return f"/tmp/jupyter-kernel-{self.kernel_id}/connection.json"

    def format_command(self, argv: list[str], extra_arguments: list[str]) -> list[str]:
        """Fill ``{connection_file}`` (and friends) into the kernel's argv."""
        values = {
            "connection_file": self.kernel_connection_file(),
            "resource_dir": getattr(self.kernel_spec, "resource_dir", ""),
            "prefix": sys.prefix,
        }
        return [_substitute(arg, values) for arg in argv] + list(extra_arguments)

    async def prepare_command(
        self, kernel_info: dict[str, Any], extra_arguments: list[str]
    ) -> list[str]:
        """The kernel's command; an engine may also write its connection file here.

        Raises named errors that fail the start (a missing interpreter, a bad config).
        """
        argv = list(self.settings.command or self.kernel_spec.argv)
        return self.format_command(argv, extra_arguments)

    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        """Start the kernel with ``cmd``/``env``, its connection file holding ``kernel_info``.

        Record every created resource on ``self`` as soon as it exists, so that
        :meth:`remove_kernel` can undo a partial start. Raises :class:`KernelStartError`
        (or :class:`EngineUnavailableError`) naming the cause; the base then removes what
        was created.
        """
        raise NotImplementedError

    async def kernel_address(self) -> tuple[str, dict[str, int]]:
        """Where this server reaches the kernel: an IP and the five named ports."""
        return self.kernel_bind_ip(), {n: self.kernel_info[n] for n in PORT_NAMES}

    async def poll_kernel(self) -> int | None:
        """None while the kernel runs, else its exit code.

        Never raises for an engine error: while the engine cannot be asked, return None
        (unknown counts as running); a kernel whose resource is gone returns a code.
        """
        raise NotImplementedError

    async def signal_kernel(self, signum: int) -> None:
        """Deliver ``signum`` to the kernel process.

        A kernel already gone is not an error. May raise (:class:`ProvisionerError` or the
        engine's own error) when the engine refuses or cannot be reached: an interrupt,
        terminate or kill is best-effort, so the base logs the cause and goes on.
        """
        raise NotImplementedError

    async def stop_kernel(self, force: bool) -> None:
        """Ask the kernel to stop (SIGTERM, grace) or, with ``force``, kill it now.

        Best-effort and idempotent, as :meth:`signal_kernel`: it may raise on an engine
        error, which the base logs; the shutdown goes on to :meth:`remove_kernel`.
        """
        raise NotImplementedError

    async def remove_kernel(self, restart: bool) -> None:
        """Remove what the start created (container, pod, secret, remote files).

        Idempotent: a resource already gone counts as removed, and a second call after a
        success does nothing. Raise when something could not be removed (the engine
        refused or was unreachable, after the hook's own short retries), keeping on
        ``self`` what is left, so that a later call retries it: the base records the
        kernel (:mod:`.leftovers`), keeps its port records and retries until it is gone.
        Clear the state (``has_kernel()`` False) only once everything is removed. With
        ``restart`` the engine session (client, SSH link) may be kept for the next start.
        Raise :class:`~provisioners.lifecycle.leftovers.RemovalPending` when the engine accepted the
        removal but has not finished it (a pod still terminating): the base records it
        the same way, without logging a failure, and confirms it every second.
        """

    async def start_given_up(self) -> None:
        """A start failed (or fell back) before :meth:`start_kernel` created anything:
        release what :meth:`check_engine` or :meth:`prepare_command` opened for it (an
        SSH link). Never raises."""

    def shutdown_coming(self) -> None:
        """The manager asked for a shutdown (or a restart): the kernel's exit that follows
        is expected, not a crash. Never raises."""

    async def settle_clients(self) -> None:
        """After a restart on the same ports, once the kernel answers on shell and iopub:
        return once sockets that clients kept open through it (a notebook's iopub,
        reconnecting by itself) can reach the new kernel, where the engine's relays make
        that later (docker-proxy). Never raises."""

    async def claim_kernel(self, pool_id: str, username: str = "") -> None:
        """Rename what a warm kernel started as ``pool_id`` to :attr:`kernel_id` (names,
        labels, annotations), so that ``list``, ``cleanup`` and the orphan sweep see it
        under the id it was claimed for; record ``username`` (the claiming request's user,
        '' for none) as the kernel's user where the engine records one. May raise: the
        claim is then given up, the warm kernel removed and the request started cold.
        """

    def uses_request_cwd(self) -> bool:
        """True where the start request's ``cwd`` reaches the kernel (a local process):
        a warm kernel started elsewhere cannot serve such a request."""
        return False

    def has_kernel(self) -> bool:
        """True once :meth:`start_kernel` has created the kernel's process or resource."""
        return self.started

    def port_record_fields(self) -> dict[str, Any]:
        """Fields kept with the kernel's port records (a local kernel's pid and start tick)."""
        return {}

    def kernel_state(self) -> dict[str, Any]:
        """JSON-safe state that lets another server process reconnect to the kernel."""
        return {}

    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`kernel_state` (and reattach to the engine)."""

    async def adoptable_kernels(self) -> list[dict[str, Any]]:
        """Running kernels on this engine that this server may adopt: of the settings'
        kernelspec (and, where the engine knows one, installation: a chart release and
        namespace), not warm, started with ``persist_kernels``, whose owner record is
        detached or names a server known to be gone (:func:`.owner.adoptable`).

        Each as a kernel's saved state: ``{"kernel_id", "kernel_info" (the kernel's own
        connection file, key and Curve keys as text), "ports", "port_host", "state" (as
        :meth:`kernel_state` gives it), "username" (the kernel's user as recorded on the
        engine, '' for none)}``. Raises :class:`EngineUnavailableError` when the
        engine cannot be reached; a kernel whose record cannot be read is left out and
        logged (without its key).
        """
        return []

    async def detach_kernel(self) -> None:
        """This server stops and the kernel lives on: write :func:`.owner.detached_mark`
        as its owner record (so the next server adopts it and sweeps wait
        ``adoption_grace``), and let go of what this server holds for it (relays,
        port-forwards, links) without stopping or removing the kernel.

        Best-effort: may raise on an engine error; the lifecycle logs it and the kernel is
        then adopted, or swept, as a gone server's.
        """

    async def sweep_orphans(self) -> list[str]:
        """Remove what kernels of dead servers left on this engine; return what was removed.

        Only resources whose owner is known to be gone are touched (see
        :func:`provisioners.lifecycle.owner.owner_is_gone`); a live server's kernels never are.
        """
        return []

    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernels this engine knows of, as JSON-safe rows (kernel_id, owner, username
        (the kernel's user, '' for none), ...)."""
        return []


def kernel_row(
    kernel_id: str,
    *,
    target: str,
    kernelspec: str,
    where: str,
    state: str,
    owner: str,
    created: float,
    **extra: Any,
) -> dict[str, Any]:
    """One kernel as an engine's :meth:`Engine.list_kernels` reports it.

    ``where`` names what runs it (a container, a pod, a host and pid); ``created`` is
    when it started (epoch seconds, 0 when unknown); ``owner`` is the server identity.
    """
    return {
        "kernel_id": kernel_id,
        "kernelspec": kernelspec,
        "target": target,
        "where": where,
        "state": state,
        "owner": owner,
        "created": created,
        **extra,
    }


def _substitute(arg: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        arg = arg.replace("{" + name + "}", value)
    return arg

"""The local engine: one kernel as a process of this machine (also every target's fallback)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from jupyter_core.paths import jupyter_runtime_dir

from ..connection.files import PORT_NAMES, launch_kernel, write_connection_file
from ..connection.ports import ClusterPortCache, on_reclaim, process_alive, process_start_time
from ..exceptions import EngineUnavailableError
from ..executor import EngineExecutor
from ..lifecycle.engine import Engine
from ..parameters import fallback_refusal

#: Keyword arguments of a start request that reach the process launcher.
_LAUNCH_KWARGS = ("stdin", "stdout", "stderr", "cwd", "independent")

#: The local target's blocking calls (port store, process waits).
LOCAL_EXECUTOR = EngineExecutor("local", max_workers=4)


class LocalEngine(Engine):
    """A kernel as a local subprocess, with ports from the cluster-aware cache."""

    target: ClassVar[str] = "local"
    #: A local kernel is this server's child process: it ends with the server.
    persists: ClassVar[bool] = False
    executor: ClassVar[EngineExecutor] = LOCAL_EXECUTOR

    def __init__(self, settings: Any, kernel_id: str) -> None:
        super().__init__(settings, kernel_id)
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.pgid: int | None = None
        self._pid_start = ""
        self._connection_file = ""
        #: The connection file is this engine's to delete (no kernel manager wrote it).
        self._owns_connection_file = False
        self.cwd: str | None = None

    @property
    def _tunneled(self) -> bool:
        """Clients reach this kernel through SSH tunnels (never a fallback's)."""
        return bool(self.settings.ssh_server) and not self.fallback_for

    def needs_ports(self) -> bool:
        return getattr(self.manager, "transport", "tcp") == "tcp"

    def reached_on_own_ports(self) -> bool:
        return not self._tunneled

    def binds_ports_here(self) -> bool:
        return True  # a process of this machine, tunnels or not

    def uses_request_cwd(self) -> bool:
        return True

    def server_path(self, path: str) -> str | None:
        """As jupyter_client's LocalProvisioner: relative to the kernel's cwd, if it exists."""
        resolved = Path(path).expanduser()
        if not resolved.is_absolute() and self.cwd:
            resolved = (Path(self.cwd) / resolved).resolve()
        return resolved.as_posix() if resolved.exists() else None

    def kernel_bind_ip(self) -> str:
        return getattr(self.manager, "ip", "") or "127.0.0.1"

    def kernel_connection_file(self) -> str:
        if not self._connection_file:
            # Through SSH tunnels the kernel manager's file holds the tunnel ports: the
            # kernel gets a file of its own.
            km_file = "" if self._tunneled else getattr(self.manager, "connection_file", "")
            suffix = "-tunneled" if self._tunneled else ""
            self._connection_file = km_file or str(
                Path(jupyter_runtime_dir()) / f"kernel-{self.kernel_id}{suffix}.json"
            )
        return self._connection_file

    async def prepare_command(
        self, kernel_info: dict[str, Any], extra_arguments: list[str]
    ) -> list[str]:
        """Write the connection file where the kernel manager keeps it, then format argv.

        As the fallback: :class:`EngineUnavailableError` when the request chose resource
        launch parameters that a local process cannot have."""
        if self.fallback_for:
            params = self.settings.launch_parameters
            refusal = fallback_refusal(params, self.fallback_for, self.fallback_cause)
            if refusal:
                raise EngineUnavailableError(
                    refusal, target=self.fallback_for, kernel_id=self.kernel_id
                )
        km = self.manager
        if km is not None and hasattr(km, "format_kernel_cmd") and not self._tunneled:
            if not km.connection_file:  # named after the kernel, so sweeps can find it
                km.connection_file = self.kernel_connection_file()
            elif _file_ports(km.connection_file) not in ({}, _ports_of(kernel_info)):
                km.cleanup_connection_file()  # a restart moved a taken port: rewrite it
            km.load_connection_info(kernel_info)
            km.write_connection_file()
            kernel_info.update(km.get_connection_info())
            self._connection_file = km.connection_file
            self._owns_connection_file = False
            if self.settings.command:
                return self.format_command(list(self.settings.command), extra_arguments)
            return list(km.format_kernel_cmd(extra_arguments=extra_arguments))
        fields = {k: v for k, v in kernel_info.items() if k != "kernel_name"}
        write_connection_file(self.kernel_connection_file(), **fields)
        self._owns_connection_file = True
        return await super().prepare_command(kernel_info, extra_arguments)

    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        launch_args = {k: kwargs[k] for k in _LAUNCH_KWARGS if k in kwargs}
        self.cwd = kwargs.get("cwd")
        self.process = launch_kernel(cmd, env=env, **launch_args)
        self.pid = self.process.pid
        self._pid_start = process_start_time(self.pid)
        try:
            self.pgid = os.getpgid(self.pid)
        except OSError:
            self.pgid = None
        self.started = True
        if self.needs_ports():  # so a dead server's kernel can be reclaimed with its ports
            await self.executor.run(
                ClusterPortCache.instance().annotate,
                self.allocation_owner,
                **self.port_record_fields(),
            )
        self.log.debug("Kernel %s: local process %s started", self.kernel_id, self.pid)

    async def poll_kernel(self) -> int | None:
        if self.process is not None:
            return self.process.poll()
        if self.pid is None:
            return 0
        # not our child (reattached): a zombie or a reused pid is an exited kernel
        return None if process_alive(self.pid, self._pid_start) else 0

    async def signal_kernel(self, signum: int) -> None:
        if self.pid is None or await self.poll_kernel() is not None:
            return
        try:
            if self.pgid is not None and signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                os.killpg(self.pgid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    async def stop_kernel(self, force: bool) -> None:
        await self.signal_kernel(signal.SIGKILL if force else signal.SIGTERM)

    async def remove_kernel(self, restart: bool) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                await self.stop_kernel(force=True)
            try:
                await self.executor.run(self.process.wait, 5)
            except subprocess.TimeoutExpired:
                self.log.warning("Kernel %s: process %s did not exit", self.kernel_id, self.pid)
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
        self.process = None
        self.pid = self.pgid = None
        self._pid_start = ""
        self.started = False
        if not restart and self._owns_connection_file and self._connection_file:
            Path(self._connection_file).unlink(missing_ok=True)

    def port_record_fields(self) -> dict[str, Any]:
        if self.pid is None:
            return {}
        fallback = {"fallback_for": self.fallback_for} if self.fallback_for else {}
        return {"kernel_pid": self.pid, "kernel_start": self._pid_start, **fallback}

    def kernel_state(self) -> dict[str, Any]:
        return {"pid": self.pid, "pgid": self.pgid, "start": self._pid_start}

    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        self.pid = state.get("pid")
        self.pgid = state.get("pgid")
        self._pid_start = str(state.get("start") or "")
        if self.pid is not None and not self._pid_start:
            self._pid_start = process_start_time(self.pid)  # state of an older version
        self.started = self.pid is not None


def _ports_of(info: dict[str, Any]) -> dict[str, int]:
    return {name: int(info.get(name) or 0) for name in PORT_NAMES}


def _file_ports(path: str) -> dict[str, int]:
    """The ports a connection file holds ({} when there is none to read)."""
    try:
        return _ports_of(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def reclaim_local_kernels(runtime_dir: Path, records: list[dict[str, Any]]) -> None:
    """What a dead server's local kernels left with their port records: a kernel process
    that outlived its server is killed (ipykernel can hang while exiting after its parent
    died), and its connection file in the runtime dir, ``kernel-<id>.json``, removed."""
    owners = {str(r.get("owner", "")) for r in records}
    kernels = {
        (int(r["kernel_pid"]), str(r.get("kernel_start", "")))
        for r in records
        if r.get("kernel_pid")
    }
    for owner in owners:
        if owner.startswith("kernel-") and "/" not in owner:
            (runtime_dir / f"{owner}.json").unlink(missing_ok=True)
    for pid, start in kernels:
        _kill_process_group(pid, start)


def _kill_process_group(pid: int, start: str) -> None:
    """SIGKILL the process group led by ``pid`` if that very process still runs."""
    if not process_alive(pid, start):
        return
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


on_reclaim(reclaim_local_kernels)

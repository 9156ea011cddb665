"""The SSH engine: one kernel as a detached process of a remote host.

The kernel binds 127.0.0.1 on the remote host and is reached through the lifecycle's
SSH tunnels, over the same shared SSH link (:meth:`SharedSettings.ssh_settings`) as the
remote commands and SFTP.

Each kernel gets a 0700 directory ``<remote_runtime_dir>/cluster-kernel-<kernel id>``
holding its connection file (0600, uploaded over SFTP), its launcher script (the env as
quoted ``export`` lines and the quoted argv: no value ever reaches a command line), its
owner (the server identity, for :func:`~provisioners.ssh.remote.sweep_host`), its pid
and its log; with ``persist_kernels`` also ``persist`` (the adoption grace). The kernel
starts with ``setsid nohup`` in a session of its own, so it survives the SSH session
and link that started it (and the server: :meth:`SSHEngine.detach_kernel`); it is
polled and signalled by pid (and start time, against pid reuse) over SSH. Every
remote command is a POSIX sh script run by ``/bin/sh -c`` (see :meth:`SSHLink.sh`) in
which every value is quoted with :func:`shlex.quote`.

The remote side (directory layout, scripts, sweeps and listings) is in
:mod:`provisioners.ssh.remote`.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import signal
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import paramiko

from ..connection.files import PORT_NAMES, connection_file_content
from ..connection.ports import PortSource
from ..connection.readiness import wait_until_listening
from ..connection.sshlink import SSH_EXECUTOR, CommandResult, SSHLink
from ..connection.sshprobe import forwarded_zmq_listens
from ..exceptions import ForwardingRefusedError, KernelStartError, ProvisionerError, TunnelError
from ..executor import EngineExecutor
from ..lifecycle.engine import Engine, kernel_row
from ..lifecycle.failed_start import exited_while_starting
from ..lifecycle.owner import detached_mark
from ..usernames import check_username, expand_env, expand_username
from .remote import (
    OWNER_FILE,
    PERSIST_FILE,
    RemoteListeningPorts,
    adoptable_remote_kernels,
    alive_function,
    exit_report_script,
    expand_home,
    is_kernel_dir,
    kernel_dir_name,
    kill_script,
    list_remote_kernels,
    remove_script,
    shell_quote,
    sweep_host,
    write_owner_script,
    write_user_script,
)

if TYPE_CHECKING:
    from .provisioner import SSHClusterProvisioner

__all__ = ["SSHEngine"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REMOTE_ERRORS = (TunnelError, paramiko.SSHException, EOFError, OSError)
#: Exit codes of the remote preparation scripts.
_NO_INTERPRETER = 127
_NO_CWD = 3
_NO_DIR = 4
#: The start's probe: seconds a forwarded heartbeat connection may take to greet, and
#: between two tries (each failed try is followed by a check that the kernel still runs).
_PROBE_TIMEOUT = 1.0
_PROBE_INTERVAL = 0.2
#: Longest a detach may take (closing the tunnels, writing the detached mark): a stopping
#: server detaches every kernel well inside its termination grace.
_DETACH_TIMEOUT = 4.0
#: Hosts (host, port, user, runtime dir) this process has swept for orphans.
_SWEPT: set[tuple[str, int, str, str]] = set()
_SWEPT_LOCK = threading.Lock()


class SSHEngine(Engine):
    """A kernel on a remote host over SSH, reached through SSH tunnels.

    Error contract, beyond :class:`Engine`'s: an unreachable host or a failed login is
    :class:`SSHUnreachableError` (from :meth:`check_engine`: the fallback applies); a
    missing interpreter, working directory or kernel directory, a failed upload, a server
    that refuses TCP forwarding and a kernel that exits while starting are
    :class:`KernelStartError` / :class:`ForwardingRefusedError` naming the host. Remote
    commands that fail on the way raise :class:`TunnelError`.
    """

    target: ClassVar[str] = "ssh"
    executor: ClassVar[EngineExecutor] = SSH_EXECUTOR
    settings: SSHClusterProvisioner

    def __init__(self, settings: Any, kernel_id: str) -> None:
        super().__init__(settings, kernel_id)
        self._link: SSHLink | None = None
        self._link_lock = asyncio.Lock()
        self._home = ""
        #: The kernel's private directory on the remote host ('' before the start).
        self.kernel_dir = ""
        #: The kernel's pid on the remote host, its start tick (against pid reuse) and
        #: whether it leads a process group (started with setsid).
        self.pid: int | None = None
        self.start_tick = ""
        self.group = False
        self._stopping = False
        self._exit_reported = False
        #: This server let go of the kernel (:meth:`detach_kernel`): it is no longer
        #: polled, signalled or removed from here.
        self.detached = False

    # ------------------------------------------------------------------ SSH plumbing

    @property
    def _where(self) -> str:
        """``user@host:port`` of the remote host, for messages."""
        return self.settings.ssh_settings().address

    async def _get_link(self) -> SSHLink:
        async with self._link_lock:
            if self._link is None or self._link.closed:
                self._link = await self.executor.run(SSHLink.acquire, self.settings.ssh_settings())
            return self._link

    async def _release_link(self) -> None:
        async with self._link_lock:
            link, self._link = self._link, None
        if link is not None:
            await self.executor.run(link.release)

    async def _run(self, script: str, *, timeout: float | None = None) -> CommandResult:
        link = await self._get_link()
        timeout = timeout or self.settings.command_timeout
        return await self.executor.run(link.sh, script, timeout=timeout)

    def _start_error(self, msg: str) -> KernelStartError:
        return KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)

    # ------------------------------------------------------------------ hooks

    async def check_engine(self) -> None:
        """Connect; unreachable host → :class:`SSHUnreachableError` (fallback allowed)."""
        link = await self._get_link()
        await self.executor.run(link.transport)

    def allocation_host(self) -> str:
        return f"ssh:{self.settings.host.lower()}"

    def port_sources(self) -> list[PortSource]:
        if self._link is None:
            return []
        return [RemoteListeningPorts(self._link, self.settings.command_timeout)]

    def kernel_bind_ip(self) -> str:
        return "127.0.0.1"

    def kernel_connection_file(self) -> str:
        return posixpath.join(self.kernel_dir, "connection.json")

    async def start_given_up(self) -> None:
        """Release the SSH link :meth:`check_engine` opened. Never raises."""
        try:
            await self._release_link()
        except Exception as exc:  # a link that fails to close is closed anyway
            self.log.debug("Kernel %s: releasing the SSH link: %s", self.kernel_id, exc)

    async def prepare_command(
        self, kernel_info: dict[str, Any], extra_arguments: list[str]
    ) -> list[str]:
        """Check the remote interpreter, resolve the kernel's directory, format argv.

        Raises :class:`KernelStartError` when the interpreter is missing or the host's
        home cannot be read; a config error when there is no argv.
        """
        argv = list(self.settings.command or self.kernel_spec.argv)
        if not argv:
            raise self.settings.config_error(
                "command", "the kernelspec has no argv and no command is set"
            )
        script = (
            'printf "%s\\n" "$HOME"\n'
            f"command -v -- {shell_quote(argv[0])} >/dev/null 2>&1 || exit {_NO_INTERPRETER}\n"
        )
        link = await self._get_link()
        # the upload's SFTP session opens meanwhile (it may start a login shell too)
        result, _ = await asyncio.gather(
            self._run(script), self.executor.run(link.warm_sftp, self.settings.command_timeout)
        )
        if result.returncode == _NO_INTERPRETER:
            raise self._start_error(
                f"kernel command {argv[0]!r} not found on {self._where} (PATH of a "
                "non-interactive SSH session); install it there or give its absolute path "
                "in the argv"
            )
        home = result.stdout.splitlines()[0].strip() if result.stdout.strip() else ""
        if result.returncode != 0 or not posixpath.isabs(home):
            raise self._start_error(
                f"probing {self._where} failed (status {result.returncode}): "
                f"{result.stderr.strip()}"
            )
        self._home = home
        runtime = posixpath.normpath(expand_home(self.settings.remote_runtime_dir, home))
        self.kernel_dir = posixpath.join(runtime, kernel_dir_name(self.kernel_id))
        return self.format_command(argv, extra_arguments)

    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        """Make the kernel's directory, upload its files, launch it detached and wait
        until its heartbeat answers through the SSH server (see :meth:`_wait_ready`).
        ``{username}`` in ``remote_cwd`` and ``env`` is the kernel's user as a path
        segment; :class:`~provisioners.usernames.UsernameError` names the setting that
        uses it when there is none."""
        username = check_username(self.settings.username or env.get("KERNEL_USERNAME", ""))
        remote_cwd = expand_username(
            self.settings.remote_cwd, username, "path", setting="remote_cwd"
        )
        env = expand_env(env, self.settings.env, username)
        await self._sweep_once()
        kernel_dir = self.kernel_dir
        runtime = posixpath.dirname(kernel_dir)
        cwd = posixpath.normpath(expand_home(remote_cwd or "~", self._home))
        if kwargs.get("cwd"):
            self.log.debug("Kernel %s: the server-side cwd is not used remotely", self.kernel_id)
        where = self._where
        spec_file = shell_quote(kernel_dir + "/kernelspec")
        owner_file = shell_quote(posixpath.join(kernel_dir, OWNER_FILE))
        prepare = (
            "umask 077\n"
            f"[ -d {shell_quote(cwd)} ] || exit {_NO_CWD}\n"
            f"mkdir -p -- {shell_quote(runtime)} || exit {_NO_DIR}\n"
            f"rm -rf -- {shell_quote(kernel_dir)}\n"
            f"mkdir -m 700 -- {shell_quote(kernel_dir)} || exit {_NO_DIR}\n"
            f"printf '%s\\n' {shell_quote(self.settings.owner)} > {owner_file}\n"
            f"printf '%s\\n' {shell_quote(self.settings.spec_name)} > {spec_file}\n"
        )
        if username:
            prepare += write_user_script(kernel_dir, username)
        if self.settings.persist_kernels:  # the kernel outlives its server: see the sweep
            persist_file = shell_quote(posixpath.join(kernel_dir, PERSIST_FILE))
            prepare += f"printf '%s\\n' {self.settings.adoption_grace:g} > {persist_file}\n"
        result = await self._run(prepare)
        if result.returncode == _NO_CWD:
            raise self._start_error(f"remote working directory {cwd!r} does not exist on {where}")
        if result.returncode != 0:
            raise self._start_error(
                f"cannot create the kernel directory {kernel_dir!r} on {where}: "
                f"{result.stderr.strip() or result.returncode}"
            )
        self.progress("kernel directory created", f"{kernel_dir} on {where}")
        launcher = self._launcher(cmd, env, cwd)
        link = await self._get_link()
        await self.executor.run(
            self._upload,
            link,
            {
                "connection.json": connection_file_content(kernel_info),
                "launch.sh": launcher.encode(),
            },
        )
        self.progress("uploaded", "connection file and launcher (SFTP)")
        log_file = posixpath.join(kernel_dir, "kernel.log")
        launch_script = shell_quote(posixpath.join(kernel_dir, "launch.sh"))
        run = f"/bin/sh {launch_script} </dev/null >{shell_quote(log_file)} 2>&1"
        pid_file = shell_quote(kernel_dir + "/pid")
        launch = (
            "cd /\n"
            "if command -v setsid >/dev/null 2>&1; then\n"
            f"  setsid nohup {run} & G=1\n"
            "else\n"
            f"  nohup {run} & G=0\n"
            "fi\n"
            "P=$!\n"
            "S=$(sed 's/.*) //' /proc/$P/stat 2>/dev/null | cut -d' ' -f20)\n"
            f'printf \'%s %s %s\\n\' "$P" "${{S:--}}" "$G" | tee {pid_file}\n'
        )
        result = await self._run(launch)
        try:
            pid_text, start, group = result.stdout.split()[:3]
            self.pid = int(pid_text)
        except ValueError as exc:
            msg = f"starting the kernel on {where} failed: {result.stderr.strip() or result.stdout}"
            raise self._start_error(msg) from exc
        self.start_tick = "" if start == "-" else start
        self.group = group == "1"
        self.started = True
        self.progress("kernel process started", f"pid {self.pid} on {where}")
        await self._wait_ready(int(kernel_info["hb_port"]))

    async def _wait_ready(self, hb_port: int) -> None:
        """Return once the kernel's heartbeat answers through the SSH server.

        Fails at once, naming the cause, when the server refuses to forward TCP
        connections (:class:`ForwardingRefusedError`), and with the end of the kernel's
        log when the kernel exits first (a missing module, a wrong interpreter, bad
        arguments): :class:`KernelStartError`.
        """
        pid = self.pid
        assert pid is not None
        where = self._where
        log_file = posixpath.join(self.kernel_dir, "kernel.log")
        link = await self._get_link()

        async def heartbeat_listens() -> bool:
            try:
                return await self.executor.run(
                    forwarded_zmq_listens, link, self.kernel_bind_ip(), hb_port, _PROBE_TIMEOUT
                )
            except ForwardingRefusedError as exc:
                exc.target, exc.kernel_id = self.target, self.kernel_id
                raise

        async def still_running() -> None:
            result = await self._run(exit_report_script(pid, self.start_tick, log_file))
            status, _, log = result.stdout.partition("\n")
            if status.strip() == "gone":
                self._exit_reported = True
                where_pid = f"pid {pid} on {where}"  # not our child: its exit code is not kept
                raise self._start_error(exited_while_starting(None, where_pid, log))

        # as before the probe loop was shared: probe, then (after each failed probe and a
        # pause) check that the kernel still runs before probing again
        await wait_until_listening(
            heartbeat_listens,
            still_running,
            interval=_PROBE_INTERVAL,
            check_every=0.0,
            first_check=_PROBE_INTERVAL,
        )

    def _launcher(self, cmd: list[str], env: dict[str, str], cwd: str) -> str:
        lines = ["# cluster-provisioners kernel launcher (generated)"]
        for name, value in sorted(env.items()):
            if not _ENV_NAME.match(name) or "\0" in value:
                self.log.warning(
                    "Kernel %s: environment variable %r cannot be passed to a remote shell; "
                    "skipped",
                    self.kernel_id,
                    name,
                )
                continue
            lines.append(f"export {name}={shell_quote(value)}")
        lines.append(f"cd -- {shell_quote(cwd)} || exit 126")
        lines.append("exec " + " ".join(shell_quote(arg) for arg in cmd))
        return "\n".join(lines) + "\n"

    def _upload(self, link: SSHLink, files: dict[str, bytes]) -> None:
        """Write ``files`` (0600) into the kernel directory over SFTP (blocking)."""
        try:
            with link.sftp(self.settings.command_timeout) as sftp:
                for name, data in files.items():
                    path = posixpath.join(self.kernel_dir, name)
                    with sftp.open(path, "wb") as remote:
                        remote.chmod(0o600)
                        remote.write(data)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            msg = f"uploading the kernel's files to {link.settings.address} failed: {exc}"
            raise self._start_error(msg) from exc

    async def poll_kernel(self) -> int | None:
        """None while the remote process runs (or the host cannot be asked), else 0 (its
        exit status is not known); an exit nobody asked for is logged with its log's end."""
        if self.pid is None:
            return 0
        if self.detached:  # not ours to watch any more: it runs as far as we know
            return None
        report = not (self._stopping or self._exit_reported) and is_kernel_dir(self.kernel_dir)
        log_file = shell_quote(self.kernel_dir + "/kernel.log")
        log_tail = f"; tail -n 20 -- {log_file}" if report else ""
        script = (
            f"{alive_function(self.pid, self.start_tick)}\n"
            f"if alive; then echo running; else echo gone{log_tail}; fi\n"
        )
        try:
            result = await self._run(script)
        except TunnelError as exc:
            self.log.warning("Kernel %s: polling over SSH failed: %s", self.kernel_id, exc)
            return None
        status, _, log = result.stdout.partition("\n")
        if status.strip() != "gone":
            return None
        if report:  # it exited unasked: say why, once
            self._exit_reported = True
            self.log.warning(
                "Kernel %s on %s exited; the end of its log:\n%s",
                self.kernel_id,
                self.settings.host,
                log.rstrip() or "(empty)",
            )
        return 0  # the exit status of a detached remote process is not known

    async def signal_kernel(self, signum: int) -> None:
        """Signal the remote process (its group for INT, TERM and KILL). Raises
        :class:`ProvisionerError` for an unknown signal and :class:`TunnelError` when the
        host cannot be reached."""
        if self.pid is None or self.detached:
            return
        try:
            name = signal.Signals(signum).name.removeprefix("SIG")
        except ValueError as exc:
            msg = f"unknown signal {signum}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        group = self.group and signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
        await self._run(kill_script(self.pid, self.start_tick, group, name))

    async def stop_kernel(self, force: bool) -> None:
        """SIGTERM (or SIGKILL); a host gone away is logged, not raised: the removal
        retries and sweeps follow."""
        self._stopping = True
        try:
            await self.signal_kernel(signal.SIGKILL if force else signal.SIGTERM)
        except TunnelError as exc:
            self.log.warning("Kernel %s: stopping over SSH failed: %s", self.kernel_id, exc)

    def shutdown_coming(self) -> None:
        self._stopping = True

    async def remove_kernel(self, restart: bool) -> None:
        """Kill the process group if it still runs and remove the kernel's directory
        (nothing for a detached kernel: it is another server's, or the sweep's).

        Raises :class:`ProvisionerError`, keeping the pid and directory for a retry, when
        the host cannot be reached. The SSH link is kept for a restart only.
        """
        try:
            if self.detached:  # another server adopts it, or the sweep removes it
                return
            if self.pid is not None or self.kernel_dir:
                script = remove_script(self.pid, self.start_tick, self.group, self.kernel_dir)
                try:
                    await self._run(script, timeout=self.settings.command_timeout + 5)
                except _REMOTE_ERRORS as exc:
                    msg = (
                        f"cannot clean up on {self.settings.host} (pid {self.pid}, "
                        f"{self.kernel_dir}): {exc}"
                    )
                    raise ProvisionerError(
                        msg, target=self.target, kernel_id=self.kernel_id
                    ) from exc
            self.pid = None
            self.start_tick = ""
            self.kernel_dir = ""
            self.started = False
            self._stopping = self._exit_reported = False
        finally:
            if not restart:
                await self._release_link()

    # ------------------------------------------------------------------ persistence

    async def detach_kernel(self) -> None:
        """Let the kernel outlive this server: close its SSH tunnels if still open, write
        :func:`~provisioners.lifecycle.owner.detached_mark` as its owner file (and the
        ``persist`` file if it started without one), release this engine's SSH link. The
        kernel process is not touched: it runs in a session of its own (``setsid
        nohup``), so closing the link that started it does not end it.

        From then on this engine neither polls, signals nor removes the kernel. Bounded by
        a few seconds; raises :class:`TunnelError` (or ``TimeoutError``) when the mark
        cannot be written: the kernel is then adopted, or swept, as a gone server's.
        """
        self.detached = True
        try:
            if self.tunnels is not None:  # the lifecycle closes them first; a bare detach too
                tunnels, self.tunnels = self.tunnels, None
                try:
                    await asyncio.wait_for(tunnels.close(), _DETACH_TIMEOUT)
                except (TimeoutError, *_REMOTE_ERRORS) as exc:
                    self.log.debug("Kernel %s: closing its tunnels: %s", self.kernel_id, exc)
            if self.pid is None or not is_kernel_dir(self.kernel_dir):
                return
            # a kernel started before persist_kernels was set becomes adoptable too
            persist_file = shell_quote(posixpath.join(self.kernel_dir, PERSIST_FILE))
            script = (
                f"[ -e {persist_file} ] || "
                f"printf '%s\\n' {self.settings.adoption_grace:g} > {persist_file}\n"
            ) + write_owner_script(self.kernel_dir, detached_mark())
            timeout = min(self.settings.command_timeout, _DETACH_TIMEOUT)
            result = await asyncio.wait_for(self._run(script, timeout=timeout), _DETACH_TIMEOUT)
            if result.returncode != 0:
                msg = (
                    f"cannot mark kernel {self.kernel_id} detached on {self._where}: "
                    f"{result.stderr.strip() or result.returncode}"
                )
                raise TunnelError(msg, target=self.target, kernel_id=self.kernel_id)
            self.log.debug(
                "Kernel %s detached: pid %s on %s lives on for the next server",
                self.kernel_id,
                self.pid,
                self.settings.host,
            )
        finally:
            try:
                await asyncio.wait_for(self._release_link(), _DETACH_TIMEOUT)
            except (TimeoutError, *_REMOTE_ERRORS) as exc:
                self.log.debug("Kernel %s: releasing the SSH link: %s", self.kernel_id, exc)

    async def adoptable_kernels(self) -> list[dict[str, Any]]:
        """This kernelspec's persisted kernels on the host that run and whose owner file is
        a detached mark or names a gone server, each with its connection file (read over
        SFTP, never logged) and the state :meth:`load_kernel_state` reattaches.

        Raises :class:`SSHUnreachableError` (an :class:`EngineUnavailableError`) when the
        host cannot be reached, :class:`TunnelError` when a login or command fails.
        """
        settings = self.settings
        found = await self.executor.run(
            adoptable_remote_kernels,
            settings.ssh_settings(),
            remote_runtime_dir=settings.remote_runtime_dir,
            command_timeout=settings.command_timeout,
            kernelspec=settings.spec_name,
            log=self.log,
        )
        records = []
        for kernel, info in found:
            try:
                ports = [int(info[name]) for name in PORT_NAMES]
            except (KeyError, TypeError, ValueError):
                self.log.warning(
                    "SSH kernel %s on %s is not adoptable: its connection file lacks ports",
                    kernel.kernel_dir,
                    settings.host,
                )
                continue
            start = "" if kernel.start == "-" else kernel.start
            state = _kernel_state(settings, kernel.kernel_dir, kernel.pid, start, kernel.group)
            records.append(
                {
                    "kernel_id": kernel.kernel_id,
                    "kernel_info": info,
                    "ports": ports,
                    "port_host": self.allocation_host(),
                    "state": state,
                    "username": kernel.username,
                }
            )
        return records

    # ------------------------------------------------------------------ maintenance

    async def _sweep_once(self) -> None:
        """Sweep this host's orphans the first time this process starts a kernel there."""
        settings = self.settings
        key = (settings.host.lower(), settings.port, settings.user, settings.remote_runtime_dir)
        with _SWEPT_LOCK:
            if not settings.sweep_on_start or key in _SWEPT:
                return
            _SWEPT.add(key)
        try:
            await self.sweep_orphans()
        except (*_REMOTE_ERRORS, ProvisionerError) as exc:
            self.log.warning("Sweeping orphaned SSH kernels on %s failed: %s", settings.host, exc)

    async def sweep_orphans(self) -> list[str]:
        """Kill the kernels of dead servers on this host and remove their directories;
        mark persisted ones detached, and remove those whose adoption grace is over (see
        :func:`~provisioners.ssh.remote.sweep_host`: a kernel's grace is the one recorded
        at its start, this kernelspec's ``adoption_grace`` for a kernel without one)."""
        settings = self.settings
        removed = await self.executor.run(
            sweep_host,
            settings.ssh_settings(),
            remote_runtime_dir=settings.remote_runtime_dir,
            command_timeout=settings.command_timeout,
            grace=settings.adoption_grace,
            log=self.log,
        )
        return [f"ssh kernel {settings.host}:{kernel_dir}" for kernel_dir in removed]

    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernels on this host, whichever server started them."""
        settings = self.settings
        found = await self.executor.run(
            list_remote_kernels,
            settings.ssh_settings(),
            remote_runtime_dir=settings.remote_runtime_dir,
            command_timeout=settings.command_timeout,
        )
        return [
            kernel_row(
                kernel.kernel_id,
                target=self.target,
                kernelspec=kernel.kernelspec,
                where=f"{settings.host} pid {kernel.pid}",
                state="running" if kernel.alive else "exited",
                owner=kernel.owner,
                created=kernel.created,
                username=kernel.username,
            )
            for kernel in found
        ]

    def kernel_state(self) -> dict[str, Any]:
        return _kernel_state(self.settings, self.kernel_dir, self.pid, self.start_tick, self.group)

    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`kernel_state`, reconnect and name this server the kernel's owner.
        Raises :class:`SSHUnreachableError` when the host cannot be reached."""
        self.kernel_dir = str(state.get("kernel_dir") or "")
        self.pid = state.get("pid")
        self.start_tick = str(state.get("start") or "")
        self.group = bool(state.get("group"))
        self.started = self.pid is not None
        self.detached = False
        if self.started:
            await self._get_link()
            await self._take_ownership()

    async def _take_ownership(self) -> None:
        """Name this server as the reattached (or adopted) kernel's owner, replacing a
        detached mark or a gone server's identity, so sweeps keep it."""
        if not is_kernel_dir(self.kernel_dir):
            return
        result = await self._run(write_owner_script(self.kernel_dir, str(self.settings.owner)))
        if result.returncode != 0:
            self.log.warning(
                "Kernel %s: cannot record this server as its owner on %s: %s",
                self.kernel_id,
                self.settings.host,
                result.stderr.strip(),
            )


def _kernel_state(
    settings: Any, kernel_dir: str, pid: int | None, start: str, group: bool
) -> dict[str, Any]:
    """What :meth:`SSHEngine.load_kernel_state` reattaches to: the host and the kernel's
    directory, process id, start tick and process group."""
    return {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "kernel_dir": kernel_dir,
        "pid": pid,
        "start": start,
        "group": group,
    }

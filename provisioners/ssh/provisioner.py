"""The SSH target: the kernel runs as a detached process of a remote host.

The kernel binds 127.0.0.1 on the remote host and is reached through the base's SSH
tunnels: ``ssh_server``, ``ssh_key`` and ``ssh_password`` default to this target's
``host``/``port``/``user``/``key_file``/``password``, so the tunnels, the remote commands
and SFTP share one SSH connection. ``ssh_known_hosts``, ``ssh_accept_unknown_host_keys``
and ``ssh_connect_timeout`` apply to it.

Each kernel gets a 0700 directory ``<remote_runtime_dir>/cluster-kernel-<kernel id>``
holding its connection file (0600, uploaded over SFTP), its launcher script (the env as
quoted ``export`` lines and the quoted argv: no value ever reaches a command line), its
owner (the server identity, for :func:`sweep_orphans`), its pid and its log. The kernel
starts with ``setsid nohup`` so it survives the SSH session; it is polled and signalled
by pid (and start time, against pid reuse) over SSH. Every remote command is a POSIX
sh script run by ``/bin/sh -c`` (see :meth:`SSHLink.sh`) in which every value is quoted
with :func:`shlex.quote`.

The remote side (directory layout, scripts, sweeps and listings) is in
:mod:`provisioners.ssh.remote`.
"""

from __future__ import annotations

import asyncio
import getpass
import posixpath
import re
import signal
import threading
from typing import Any, ClassVar

import paramiko
from traitlets import Bool, Float, Int, Unicode, default

from ..connection.files import connection_file_content
from ..connection.ports import PortSource
from ..connection.sshlink import (
    SSH_EXECUTOR,
    CommandResult,
    SSHLink,
    SSHSettings,
    format_server,
)
from ..connection.sshprobe import forwarded_zmq_listens
from ..exceptions import ForwardingRefusedError, KernelStartError, ProvisionerError, TunnelError
from ..executor import EngineExecutor
from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.engine import kernel_row
from .remote import (
    DEFAULT_REMOTE_RUNTIME_DIR,
    KERNEL_DIR_PREFIX,
    RemoteKernel,
    RemoteListeningPorts,
    alive_function,
    exit_report_script,
    expand_home,
    is_kernel_dir,
    kernel_dir_name,
    kill_script,
    list_remote_kernels,
    remove_script,
    shell_quote,
    sweep_orphans,
)

__all__ = [
    "DEFAULT_REMOTE_RUNTIME_DIR",
    "KERNEL_DIR_PREFIX",
    "RemoteKernel",
    "RemoteListeningPorts",
    "SSHClusterProvisioner",
    "list_remote_kernels",
    "sweep_orphans",
]

ENTRY_POINT = "cluster-ssh-provisioner"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REMOTE_ERRORS = (TunnelError, paramiko.SSHException, EOFError, OSError)
#: Exit codes of the remote preparation scripts.
_NO_INTERPRETER = 127
_NO_CWD = 3
_NO_DIR = 4
#: Hosts (host, port, user, runtime dir) this process has swept for orphans.
_SWEPT: set[tuple[str, int, str, str]] = set()
_SWEPT_LOCK = threading.Lock()


class SSHClusterProvisioner(ClusterProvisioner):
    """Starts the kernel on a remote host over SSH and reaches it through SSH tunnels."""

    target: ClassVar[str] = "ssh"
    executor: ClassVar[EngineExecutor] = SSH_EXECUTOR
    #: 'ssh_password' follows 'password' here (and may not be set itself).
    secret_settings: ClassVar[tuple[str, ...]] = ("password",)

    host = Unicode(
        "", config=True, help="Host name or IP of the remote host the kernel runs on (required)."
    )
    port = Int(22, config=True, help="SSH port of the remote host.")
    user = Unicode("", config=True, help="Remote user name (default: the local user's name).")
    key_file = Unicode(
        "",
        config=True,
        help="Private key file to log in with (default: the SSH agent or ~/.ssh/id_*).",
    )
    password = Unicode(
        "",
        config=True,
        help="""Password to log in with, when keys are not used: a reference, never the
        password itself: 'file:/path' (mode 0600) or 'env:VARIABLE'.""",
    )
    remote_cwd = Unicode(
        "",
        config=True,
        help="""Working directory of the kernel on the remote host ('~/...' allowed; default:
        the user's home). The server-side cwd of the start request is not used.""",
    )
    remote_runtime_dir = Unicode(
        DEFAULT_REMOTE_RUNTIME_DIR,
        config=True,
        help="""Remote directory ('~/...' allowed) in which each kernel gets a private 0700
        directory holding its connection file, launcher, pid and log.""",
    )
    command_timeout = Float(
        30.0, config=True, help="Seconds each remote command or SFTP operation may take."
    )
    sweep_on_start = Bool(
        True,
        config=True,
        help="""Kill the kernels of dead servers of this machine on the host and remove their
        directories (in remote_runtime_dir), once per process, when the first kernel starts
        there.""",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._link: SSHLink | None = None
        self._link_lock = asyncio.Lock()
        self._home = ""
        self._kernel_dir = ""
        self._pid: int | None = None
        self._start_tick = ""
        self._group = False
        self._stopping = False
        self._exit_reported = False

    # ------------------------------------------------------------------ config

    @default("ssh_server")
    def _default_ssh_server(self) -> str:
        return format_server(self.user or getpass.getuser(), self.host, self.port)

    @default("ssh_key")
    def _default_ssh_key(self) -> str:
        return self.key_file

    @default("ssh_password")
    def _default_ssh_password(self) -> str:
        return self.password

    def validate_config(self) -> None:
        super().validate_config()
        if not self.host.strip() or any(c.isspace() or c in "@/" for c in self.host):
            raise self.config_error("host", f"{self.host!r} is not a host name or IP address")
        if not 0 < self.port < 65536:
            raise self.config_error("port", f"{self.port} is not a TCP port")
        if self.pool_size:
            raise self.config_error(
                "pool_size",
                "warm kernel pools are offered for the local, docker and kubernetes targets; "
                "a remote host's kernels keep its files under their kernel id",
            )
        for key in ("ssh_server", "ssh_key", "ssh_password"):
            if self.trait_has_value(key):
                raise self.config_error(
                    key,
                    "the SSH target tunnels through its own host; set host, port, user, "
                    "key_file and password instead",
                )
        for key in ("remote_runtime_dir", "remote_cwd"):
            value = getattr(self, key)
            if (value or key == "remote_runtime_dir") and not (
                posixpath.isabs(value) or value == "~" or value.startswith("~/")
            ):
                raise self.config_error(key, f"{value!r} must be absolute or start with '~/'")
        if self.command_timeout <= 0:
            raise self.config_error("command_timeout", "must be positive")

    def settings(self) -> SSHSettings:
        """How this provisioner reaches its host (the same link the tunnels use)."""
        return SSHSettings.from_server(
            self.ssh_server,
            key_file=self.ssh_key,
            password=self.secret("ssh_password"),
            known_hosts=self.ssh_known_hosts,
            accept_unknown_host_keys=self.ssh_accept_unknown_host_keys,
            connect_timeout=self.ssh_connect_timeout,
        )

    # ------------------------------------------------------------------ SSH plumbing

    async def _get_link(self) -> SSHLink:
        async with self._link_lock:
            if self._link is None or self._link.closed:
                self._link = await self.executor.run(SSHLink.acquire, self.settings())
            return self._link

    async def _release_link(self) -> None:
        async with self._link_lock:
            link, self._link = self._link, None
        if link is not None:
            await self.executor.run(link.release)

    async def _run(self, script: str, *, timeout: float | None = None) -> CommandResult:
        link = await self._get_link()
        return await self.executor.run(link.sh, script, timeout=timeout or self.command_timeout)

    @property
    def kernel_dir(self) -> str:
        """The kernel's private directory on the remote host ('' before the start)."""
        return self._kernel_dir

    @property
    def pid(self) -> int | None:
        """The kernel's pid on the remote host."""
        return self._pid

    # ------------------------------------------------------------------ engine hooks

    async def check_engine(self) -> None:
        """Connect; unreachable host → :class:`SSHUnreachableError` (fallback allowed)."""
        link = await self._get_link()
        await self.executor.run(link.transport)

    def port_host(self) -> str:
        return f"ssh:{self.host.lower()}"

    def port_sources(self) -> list[PortSource]:
        if self._link is None:
            return []
        return [RemoteListeningPorts(self._link, self.command_timeout)]

    def kernel_bind_ip(self) -> str:
        return "127.0.0.1"

    def kernel_connection_file(self) -> str:
        return posixpath.join(self._kernel_dir, "connection.json")

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            return await super().pre_launch(**kwargs)
        except BaseException:
            if not self.has_kernel():
                await self._release_link()
            raise

    async def prepare_command(
        self, kernel_info: dict[str, Any], extra_arguments: list[str]
    ) -> list[str]:
        """Check the remote interpreter, resolve the kernel's directory, format argv."""
        argv = list(self.command or self.kernel_spec.argv)
        if not argv:
            raise self.config_error("command", "the kernelspec has no argv and no command is set")
        script = (
            'printf "%s\\n" "$HOME"\n'
            f"command -v -- {shell_quote(argv[0])} >/dev/null 2>&1 || exit {_NO_INTERPRETER}\n"
        )
        link = await self._get_link()
        # the upload's SFTP session opens meanwhile (it may start a login shell too)
        result, _ = await asyncio.gather(
            self._run(script), self.executor.run(link.warm_sftp, self.command_timeout)
        )
        where = self.settings().address
        if result.returncode == _NO_INTERPRETER:
            msg = (
                f"kernel command {argv[0]!r} not found on {where} (PATH of a non-interactive "
                "SSH session); install it there or give its absolute path in the argv"
            )
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
        home = result.stdout.splitlines()[0].strip() if result.stdout.strip() else ""
        if result.returncode != 0 or not posixpath.isabs(home):
            msg = f"probing {where} failed (status {result.returncode}): {result.stderr.strip()}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
        self._home = home
        runtime = posixpath.normpath(expand_home(self.remote_runtime_dir, home))
        self._kernel_dir = posixpath.join(runtime, kernel_dir_name(self.kernel_id))
        return self.format_command(argv, extra_arguments)

    async def _sweep_once(self) -> None:
        """Sweep this host's orphans the first time this process starts a kernel there."""
        key = (self.host.lower(), self.port, self.user, self.remote_runtime_dir)
        with _SWEPT_LOCK:
            if not self.sweep_on_start or key in _SWEPT:
                return
            _SWEPT.add(key)
        try:
            await self.sweep_orphans()
        except (*_REMOTE_ERRORS, ProvisionerError) as exc:
            self.log.warning("Sweeping orphaned SSH kernels on %s failed: %s", self.host, exc)

    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        await self._sweep_once()
        kernel_dir = self._kernel_dir
        runtime = posixpath.dirname(kernel_dir)
        cwd = posixpath.normpath(expand_home(self.remote_cwd or "~", self._home))
        if kwargs.get("cwd"):
            self.log.debug("Kernel %s: the server-side cwd is not used remotely", self.kernel_id)
        where = self.settings().address
        spec_file = shell_quote(kernel_dir + "/kernelspec")
        prepare = (
            "umask 077\n"
            f"[ -d {shell_quote(cwd)} ] || exit {_NO_CWD}\n"
            f"mkdir -p -- {shell_quote(runtime)} || exit {_NO_DIR}\n"
            f"rm -rf -- {shell_quote(kernel_dir)}\n"
            f"mkdir -m 700 -- {shell_quote(kernel_dir)} || exit {_NO_DIR}\n"
            f"printf '%s\\n' {shell_quote(self.owner)} > {shell_quote(kernel_dir + '/owner')}\n"
            f"printf '%s\\n' {shell_quote(self.spec_name)} > {spec_file}\n"
        )
        result = await self._run(prepare)
        if result.returncode == _NO_CWD:
            msg = f"remote working directory {cwd!r} does not exist on {where}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
        if result.returncode != 0:
            msg = (
                f"cannot create the kernel directory {kernel_dir!r} on {where}: "
                f"{result.stderr.strip() or result.returncode}"
            )
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
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
            self._pid = int(pid_text)
        except ValueError as exc:
            msg = f"starting the kernel on {where} failed: {result.stderr.strip() or result.stdout}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self._start_tick = "" if start == "-" else start
        self._group = group == "1"
        self._started = True
        self.progress("kernel process started", f"pid {self._pid} on {where}")
        await self._await_ready(int(kernel_info["hb_port"]))

    async def _await_ready(self, hb_port: int) -> None:
        """Return once the kernel's heartbeat answers through the SSH server.

        Fails at once, naming the cause, when the server refuses to forward TCP
        connections, and with the end of the kernel's log when the kernel exits first
        (a missing module, a wrong interpreter, bad arguments).
        """
        assert self._pid is not None
        where = self.settings().address
        log_file = posixpath.join(self._kernel_dir, "kernel.log")
        link = await self._get_link()
        while True:
            try:
                if await self.executor.run(
                    forwarded_zmq_listens, link, self.kernel_bind_ip(), hb_port, 1.0
                ):
                    return
            except ForwardingRefusedError as exc:
                exc.target, exc.kernel_id = self.target, self.kernel_id
                raise
            result = await self._run(exit_report_script(self._pid, self._start_tick, log_file))
            status, _, log = result.stdout.partition("\n")
            if status.strip() == "gone":
                self._exit_reported = True
                msg = (
                    f"the kernel exited on {where} while starting (pid {self._pid}); "
                    f"the last lines of its log:\n{log.rstrip() or '(empty)'}"
                )
                raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
            await asyncio.sleep(0.2)

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
        """Write ``files`` (0600) into the kernel directory over SFTP."""
        try:
            with link.sftp(self.command_timeout) as sftp:
                for name, data in files.items():
                    path = posixpath.join(self._kernel_dir, name)
                    with sftp.open(path, "wb") as remote:
                        remote.chmod(0o600)
                        remote.write(data)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            msg = f"uploading the kernel's files to {link.settings.address} failed: {exc}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc

    async def poll_kernel(self) -> int | None:
        if self._pid is None:
            return 0
        report = not (self._stopping or self._exit_reported) and is_kernel_dir(self._kernel_dir)
        log_file = shell_quote(self._kernel_dir + "/kernel.log")
        log_tail = f"; tail -n 20 -- {log_file}" if report else ""
        script = (
            f"{alive_function(self._pid, self._start_tick)}\n"
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
                self.host,
                log.rstrip() or "(empty)",
            )
        return 0  # the exit status of a detached remote process is not known

    async def signal_kernel(self, signum: int) -> None:
        if self._pid is None:
            return
        try:
            name = signal.Signals(signum).name.removeprefix("SIG")
        except ValueError as exc:
            msg = f"unknown signal {signum}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        group = self._group and signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
        await self._run(kill_script(self._pid, self._start_tick, group, name))

    async def stop_kernel(self, force: bool) -> None:
        self._stopping = True
        try:
            await self.signal_kernel(signal.SIGKILL if force else signal.SIGTERM)
        except TunnelError as exc:  # the host went away: cleanup retries, sweeps follow
            self.log.warning("Kernel %s: stopping over SSH failed: %s", self.kernel_id, exc)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._stopping = True
        await super().shutdown_requested(restart)

    async def remove_kernel(self, restart: bool) -> None:
        """Kill the process group if it still runs and remove the kernel's directory.

        Raises, keeping the pid and directory for a retry, when the host cannot be reached.
        """
        try:
            if self._pid is not None or self._kernel_dir:
                script = remove_script(self._pid, self._start_tick, self._group, self._kernel_dir)
                try:
                    await self._run(script, timeout=self.command_timeout + 5)
                except _REMOTE_ERRORS as exc:
                    msg = (
                        f"cannot clean up on {self.host} (pid {self._pid}, "
                        f"{self._kernel_dir}): {exc}"
                    )
                    raise ProvisionerError(
                        msg, target=self.target, kernel_id=self.kernel_id
                    ) from exc
            self._pid = None
            self._start_tick = ""
            self._kernel_dir = ""
            self._started = False
            self._stopping = self._exit_reported = False
        finally:
            if not restart:
                await self._release_link()

    # ------------------------------------------------------------------ maintenance

    def _host_config(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "user": self.user,
            "key_file": self.key_file,
            "password": self.secret("password"),
            "ssh_known_hosts": self.ssh_known_hosts,
            "ssh_accept_unknown_host_keys": self.ssh_accept_unknown_host_keys,
            "ssh_connect_timeout": self.ssh_connect_timeout,
            "remote_runtime_dir": self.remote_runtime_dir,
            "command_timeout": self.command_timeout,
        }

    async def sweep_orphans(self) -> list[str]:
        """Kill the kernels of dead servers on this host and remove their directories."""
        removed = await self.executor.run(
            sweep_orphans, self.host, log=self.log, **self._host_config()
        )
        return [f"ssh kernel {self.host}:{kernel_dir}" for kernel_dir in removed]

    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernels on this host, whichever server started them."""
        found = await self.executor.run(list_remote_kernels, self.host, **self._host_config())
        return [
            kernel_row(
                kernel.kernel_id,
                target=self.target,
                kernelspec=kernel.kernelspec,
                where=f"{self.host} pid {kernel.pid}",
                state="running" if kernel.alive else "exited",
                owner=kernel.owner,
                created=kernel.created,
            )
            for kernel in found
        ]

    def kernel_state(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "kernel_dir": self._kernel_dir,
            "pid": self._pid,
            "start": self._start_tick,
            "group": self._group,
        }

    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        self._kernel_dir = str(state.get("kernel_dir") or "")
        self._pid = state.get("pid")
        self._start_tick = str(state.get("start") or "")
        self._group = bool(state.get("group"))
        self._started = self._pid is not None
        if self._started:
            await self._get_link()
            await self._take_ownership()

    async def _take_ownership(self) -> None:
        """Name this server as the reattached kernel's owner, so sweeps keep it."""
        if not is_kernel_dir(self._kernel_dir):
            return
        owner_file = shell_quote(self._kernel_dir + "/owner")
        script = (
            f"[ -d {shell_quote(self._kernel_dir)} ] || exit 0\n"
            f"printf '%s\\n' {shell_quote(self.owner)} > {owner_file}.new && "
            f"mv -f -- {owner_file}.new {owner_file}\n"
        )
        result = await self._run(script)
        if result.returncode != 0:
            self.log.warning(
                "Kernel %s: cannot record this server as its owner on %s: %s",
                self.kernel_id,
                self.host,
                result.stderr.strip(),
            )

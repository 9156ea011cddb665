"""The remote side of the SSH target: kernel directories, sh scripts, sweeps and listings.

Each kernel of the SSH target lives in a 0700 directory
``<remote_runtime_dir>/cluster-kernel-<kernel id>`` holding ``owner`` (the server
identity), ``pid`` (pid, start time against pid reuse, and whether it leads a process
group), ``connection.json``, ``launch.sh`` and ``kernel.log``. This module builds the
POSIX sh scripts that test, signal and remove such a kernel (every value quoted with
:func:`shlex.quote`), reads the ports in use on the host, and finds a host's kernel
directories: :func:`list_remote_kernels` lists them and :func:`sweep_host` (or
:func:`sweep_orphans`, configured by keywords) removes those whose owner (a server
process of this machine) has ended. Only directories with our prefix are ever removed.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..connection.ports import PortSource
from ..connection.sshlink import SSHLink, SSHSettings
from ..lifecycle.owner import owner_is_gone
from .settings import DEFAULT_REMOTE_RUNTIME_DIR, SSHTargetSettings

__all__ = [
    "DEFAULT_REMOTE_RUNTIME_DIR",
    "KERNEL_DIR_PREFIX",
    "RemoteKernel",
    "RemoteListeningPorts",
    "list_remote_kernels",
    "sweep_host",
    "sweep_orphans",
]

logger = logging.getLogger(__name__)

#: Name prefix of the per-kernel directories in the remote runtime directory.
KERNEL_DIR_PREFIX = "cluster-kernel-"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def shell_quote(value: object) -> str:
    return shlex.quote(str(value))


def kernel_dir_name(kernel_id: str) -> str:
    return KERNEL_DIR_PREFIX + (_SAFE_ID.sub("_", kernel_id)[:80] or "unnamed")


def is_kernel_dir(path: str) -> bool:
    """Only directories we create are ever removed."""
    name = posixpath.basename(path.rstrip("/"))
    return posixpath.isabs(path) and name.startswith(KERNEL_DIR_PREFIX) and "/" not in name


def expand_home(path: str, home: str) -> str:
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def alive_function(pid: int, start: str) -> str:
    """A shell function ``alive`` true while process ``pid`` (started at ``start``) runs.

    With a known start time (Linux /proc) a reused pid or a zombie counts as gone.
    """
    if start and start != "-":
        return (
            "alive() { s=$(sed 's/.*) //' /proc/"
            f"{int(pid)}/stat 2>/dev/null) || return 1; "
            '[ -n "$s" ] || return 1; set -- $s; '
            f'[ "$1" != Z ] && [ "${{20}}" = {shell_quote(start)} ]; }}'
        )
    return f"alive() {{ kill -0 {int(pid)} 2>/dev/null; }}"


def kill_script(pid: int, start: str, group: bool, signame: str) -> str:
    target = f"-- -{int(pid)}" if group else str(int(pid))
    return f"{alive_function(pid, start)}\nalive && kill -s {signame} {target}\n"


def remove_script(pid: int | None, start: str, group: bool, kernel_dir: str) -> str:
    """Kill the kernel if it still runs and remove its directory."""
    lines = []
    if pid:
        lines += [
            alive_function(pid, start),
            "if alive; then",
            f"  kill -s KILL {f'-- -{int(pid)}' if group else int(pid)} 2>/dev/null",
            "  i=0; while alive && [ $i -lt 60 ]; do sleep 0.05; i=$((i+1)); done",
            "fi",
        ]
    if kernel_dir and is_kernel_dir(kernel_dir):
        lines.append(f"rm -rf -- {shell_quote(kernel_dir)}")
    return "\n".join(lines) + "\n"


def exit_report_script(pid: int, start: str, log_file: str, lines: int = 20) -> str:
    """Prints ``running``, or ``gone`` then the last ``lines`` of ``log_file``."""
    return (
        f"{alive_function(pid, start)}\n"
        "if alive; then echo running; else echo gone; "
        f"tail -n {int(lines)} -- {shell_quote(log_file)} 2>/dev/null; fi\n"
    )


class RemoteListeningPorts(PortSource):
    """Ports in use on the remote host, read from /proc/net/tcp* (or ``ss``) over SSH."""

    def __init__(self, link: SSHLink, timeout: float) -> None:
        self.link = link
        self.timeout = timeout

    def ports_in_use(self, host: str) -> set[int]:
        return _parse_ports(self._sockets())

    def ports_listening(self, host: str) -> set[int]:
        """Ports with a listening socket: a dead kernel's connections (TIME_WAIT) do not
        keep a restarted kernel from binding its ports again."""
        return _parse_ports(self._sockets(), listening_only=True)

    def _sockets(self) -> str:
        script = "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null || ss -Htan 2>/dev/null"
        return self.link.sh(script, timeout=self.timeout).stdout


#: The LISTEN state as /proc/net/tcp writes it (hex) and as ``ss`` does.
_LISTEN = ("0A", "LISTEN")


def _parse_ports(text: str, listening_only: bool = False) -> set[int]:
    """Local ports of /proc/net/tcp lines (hex) or of ``ss -Htan`` lines (with
    ``listening_only``, of listening sockets only)."""
    ports: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[0].endswith(":") and fields[0][:-1].isdigit():
            if listening_only and fields[3] != _LISTEN[0]:
                continue
            address = fields[1]
            with_port = address.rpartition(":")[2]
            try:
                ports.add(int(with_port, 16))
            except ValueError:
                continue
        else:
            if listening_only and fields[0] != _LISTEN[1]:
                continue
            port = fields[3].rpartition(":")[2]
            if port.isdigit():
                ports.add(int(port))
    return ports


# ---------------------------------------------------------------------- sweeps, listings


@dataclass(frozen=True)
class RemoteKernel:
    """A kernel directory found on a remote host."""

    kernel_dir: str
    owner: str
    pid: int | None
    start: str
    group: bool
    alive: bool
    kernelspec: str = ""
    #: When the kernel directory was made (epoch seconds; 0 when unknown).
    created: float = 0.0

    @property
    def kernel_id(self) -> str:
        return posixpath.basename(self.kernel_dir).removeprefix(KERNEL_DIR_PREFIX)


@contextlib.contextmanager
def _host_link(ssh: SSHSettings) -> Iterator[SSHLink]:
    """A shared link to the host ``ssh`` names, held for the ``with`` block."""
    link = SSHLink.acquire(ssh)
    try:
        yield link
    finally:
        link.release()


def _remote_kernels(link: SSHLink, remote_runtime_dir: str, timeout: float) -> list[RemoteKernel]:
    """Our kernel directories under ``remote_runtime_dir`` with owner, pid and liveness."""
    home = link.sh('printf "%s" "$HOME"', timeout=timeout).stdout.strip()
    runtime = posixpath.normpath(expand_home(remote_runtime_dir, home))
    listing = (
        f"for d in {shell_quote(runtime)}/{KERNEL_DIR_PREFIX}*; do\n"
        '  [ -d "$d" ] || continue\n'
        '  o=$(head -n 1 "$d/owner" 2>/dev/null); p=$(head -n 1 "$d/pid" 2>/dev/null)\n'
        '  k=$(head -n 1 "$d/kernelspec" 2>/dev/null); t=$(stat -c %Y "$d" 2>/dev/null)\n'
        "  a=0; P=${p%% *}\n"
        '  case "$P" in ""|*[!0-9]*) ;; *) kill -0 "$P" 2>/dev/null && a=1;; esac\n'
        '  printf \'%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n\' "$d" "$o" "$p" "$a" "$k" "$t"\n'
        "done\n"
    )
    found = []
    for line in link.sh(listing, timeout=timeout).stdout.splitlines():
        kernel_dir, owner, pid_line, alive, kernelspec, created = ([*line.split("\t")] + [""] * 6)[
            :6
        ]
        if not is_kernel_dir(kernel_dir):
            continue
        fields = pid_line.split()  # "PID START GROUP", as the launch wrote it
        found.append(
            RemoteKernel(
                kernel_dir=kernel_dir,
                owner=owner,
                pid=int(fields[0]) if fields and fields[0].isdigit() else None,
                start=fields[1] if len(fields) > 1 else "-",
                group=len(fields) < 3 or fields[2] == "1",
                alive=alive == "1",
                kernelspec=kernelspec,
                created=float(created) if created.isdigit() else 0.0,
            )
        )
    return found


def list_remote_kernels(
    ssh: SSHSettings, *, remote_runtime_dir: str, command_timeout: float
) -> list[RemoteKernel]:
    """Our kernels on the host ``ssh`` names (every owner's). Blocking: call it in a thread."""
    with _host_link(ssh) as link:
        return _remote_kernels(link, remote_runtime_dir, command_timeout)


def sweep_host(
    ssh: SSHSettings,
    *,
    remote_runtime_dir: str,
    command_timeout: float,
    dry_run: bool = False,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> list[str]:
    """Kill the kernels and remove the directories on the host ``ssh`` names whose owner
    (a server process of this machine) has ended; return the directories removed (or,
    with ``dry_run``, that would be). Blocking: call it in a thread from async code.
    """
    log = log or logger
    with _host_link(ssh) as link:
        removed: list[str] = []
        for kernel in _remote_kernels(link, remote_runtime_dir, command_timeout):
            if not kernel.owner or not owner_is_gone(kernel.owner):
                continue
            if not dry_run:
                script = remove_script(kernel.pid, kernel.start, kernel.group, kernel.kernel_dir)
                link.sh(script, timeout=command_timeout + 5)
            log.info(
                "Swept orphaned SSH kernel %s on %s (owner %s)",
                kernel.kernel_dir,
                ssh.host,
                kernel.owner,
            )
            removed.append(kernel.kernel_dir)
        return removed


def sweep_orphans(
    host: str,
    *,
    port: int = 22,
    user: str = "",
    key_file: str = "",
    password: str = "",
    ssh_known_hosts: str = "",
    ssh_accept_unknown_host_keys: bool = False,
    ssh_connect_timeout: float = 10.0,
    remote_runtime_dir: str = DEFAULT_REMOTE_RUNTIME_DIR,
    command_timeout: float = 30.0,
    dry_run: bool = False,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> list[str]:
    """:func:`sweep_host` for ``host``, configured as a provisioner would be (keyword names
    match the SSH target's config keys; ``password`` is the password itself, not a
    reference). Blocking: call it in a thread from async code.
    """
    settings = SSHTargetSettings(
        host=host,
        port=port,
        user=user,
        key_file=key_file,
        ssh_known_hosts=ssh_known_hosts,
        ssh_accept_unknown_host_keys=ssh_accept_unknown_host_keys,
        ssh_connect_timeout=ssh_connect_timeout,
    )
    settings.resolved_secrets = {"password": password}
    return sweep_host(
        settings.ssh_settings(),
        remote_runtime_dir=remote_runtime_dir,
        command_timeout=command_timeout,
        dry_run=dry_run,
        log=log,
    )

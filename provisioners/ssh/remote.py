"""The remote side of the SSH target: kernel directories, sh scripts, sweeps and listings.

Each kernel of the SSH target lives in a 0700 directory
``<remote_runtime_dir>/cluster-kernel-<kernel id>`` holding ``owner`` (the server
identity, or a detached mark: :mod:`provisioners.lifecycle.owner`), ``pid`` (pid, start
time against pid reuse, and whether it leads a process group), ``kernelspec``,
``connection.json``, ``launch.sh``, ``kernel.log`` and, for a kernel started with
``persist_kernels``, ``persist`` (its adoption grace in seconds). This module builds the
POSIX sh scripts that test, signal and remove such a kernel (every value quoted with
:func:`shlex.quote`), reads the ports in use on the host, and finds a host's kernel
directories: :func:`list_remote_kernels` lists them, :func:`adoptable_remote_kernels`
reads the persisted ones a server may adopt, and :func:`sweep_host` (or
:func:`sweep_orphans`, configured by keywords) removes those whose owner (a server
process of this machine) has ended, or marks them detached when they persist (see
:func:`~provisioners.lifecycle.owner.sweep_verdict`). Only directories with our prefix
are ever removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paramiko

from ..connection.ports import PortSource
from ..connection.sshlink import SSHLink, SSHSettings
from ..lifecycle.owner import adoptable, detached_mark, detached_since, sweep_verdict
from ..settings import SharedSettings
from .settings import DEFAULT_REMOTE_RUNTIME_DIR, SSHTargetSettings

__all__ = [
    "DEFAULT_REMOTE_RUNTIME_DIR",
    "KERNEL_DIR_PREFIX",
    "RemoteKernel",
    "RemoteListeningPorts",
    "adoptable_remote_kernels",
    "list_remote_kernels",
    "sweep_host",
    "sweep_orphans",
]

logger = logging.getLogger(__name__)

#: Name prefix of the per-kernel directories in the remote runtime directory.
KERNEL_DIR_PREFIX = "cluster-kernel-"
#: The file in a kernel's directory naming its owner (a server identity or a detached mark).
OWNER_FILE = "owner"
#: The file in a kernel's directory that marks it persisted (``persist_kernels``); it
#: holds the kernel's adoption grace in seconds.
PERSIST_FILE = "persist"
#: The file in a kernel's directory naming its user (KERNEL_USERNAME), hex-encoded UTF-8 so
#: that no name can break a line of the listing.
USER_FILE = "user"
#: A persisted kernel's grace when its ``persist`` file names none.
DEFAULT_ADOPTION_GRACE = float(SharedSettings.adoption_grace.default_value)
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


def write_owner_script(kernel_dir: str, owner: str) -> str:
    """Replace the owner file of ``kernel_dir`` with ``owner`` (atomically), if the
    directory still exists (a kernel removed meanwhile is not recreated)."""
    owner_file = shell_quote(posixpath.join(kernel_dir, OWNER_FILE))
    return (
        f"[ -d {shell_quote(kernel_dir)} ] || exit 0\n"
        f"printf '%s\\n' {shell_quote(owner)} > {owner_file}.new && "
        f"mv -f -- {owner_file}.new {owner_file}\n"
    )


def write_user_script(kernel_dir: str, username: str) -> str:
    """Write ``username`` as the user file of ``kernel_dir`` (see :data:`USER_FILE`)."""
    user_file = shell_quote(posixpath.join(kernel_dir, USER_FILE))
    return f"umask 077\nprintf '%s\\n' {username.encode().hex()} > {user_file}\n"


def read_user(text: str) -> str:
    """The user a user file's line names ('' when none or unreadable)."""
    try:
        return bytes.fromhex(text.strip()).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


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
    #: Started with ``persist_kernels`` (a ``persist`` file), and the adoption grace it
    #: names (None when it names none).
    persisted: bool = False
    grace: float | None = None
    #: The kernel's user (its :data:`USER_FILE`; '' when none).
    username: str = ""

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
    """Our kernel directories under ``remote_runtime_dir`` with owner, pid and liveness
    (with a known start tick, a reused pid or a zombie counts as gone)."""
    home = link.sh('printf "%s" "$HOME"', timeout=timeout).stdout.strip()
    runtime = posixpath.normpath(expand_home(remote_runtime_dir, home))
    listing = (
        "alive() {\n"
        '  case "$1" in ""|*[!0-9]*) return 1;; esac\n'
        '  case "$2" in ""|-) kill -0 "$1" 2>/dev/null; return;; esac\n'
        "  s=$(sed 's/.*) //' /proc/$1/stat 2>/dev/null) || return 1\n"
        '  [ -n "$s" ] || return 1; w=$2; set -- $s\n'
        '  [ "$1" != Z ] && [ "${20}" = "$w" ]\n'
        "}\n"
        f"for d in {shell_quote(runtime)}/{KERNEL_DIR_PREFIX}*; do\n"
        '  [ -d "$d" ] || continue\n'
        f'  o=$(head -n 1 "$d/{OWNER_FILE}" 2>/dev/null); p=$(head -n 1 "$d/pid" 2>/dev/null)\n'
        '  k=$(head -n 1 "$d/kernelspec" 2>/dev/null); t=$(stat -c %Y "$d" 2>/dev/null)\n'
        f'  g=; [ -f "$d/{PERSIST_FILE}" ] && g="p $(head -n 1 "$d/{PERSIST_FILE}" 2>/dev/null)"\n'
        f'  u=$(head -n 1 "$d/{USER_FILE}" 2>/dev/null)\n'
        '  a=0; set -- $p; alive "${1:-}" "${2:-}" && a=1\n'
        "  printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "
        '"$d" "$o" "$p" "$a" "$k" "$t" "$g" "$u"\n'
        "done\n"
    )
    found = []
    for line in link.sh(listing, timeout=timeout).stdout.splitlines():
        kernel_dir, owner, pid_line, alive, kernelspec, created, persist, user = (
            [*line.split("\t")] + [""] * 8
        )[:8]
        if not is_kernel_dir(kernel_dir):
            continue
        fields = pid_line.split()  # "PID START GROUP", as the launch wrote it
        grace_text = persist[2:].strip()  # "p GRACE" when the persist file exists
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
                persisted=persist.startswith("p"),
                grace=_grace(grace_text),
                username=read_user(user),
            )
        )
    return found


def _grace(text: str) -> float | None:
    """The adoption grace a ``persist`` file names, or None when it names none."""
    try:
        grace = float(text)
    except ValueError:
        return None
    return grace if grace >= 0 else None


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
    grace: float | None = None,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> list[str]:
    """Sweep the kernels on the host ``ssh`` names by their owner record
    (:func:`~provisioners.lifecycle.owner.sweep_verdict`): kill and remove those whose
    owner (a server process of this machine) has ended without persisting them, and the
    detached ones whose adoption grace is over (or whose process ended: nothing is left
    to adopt); mark the persisted kernels of an ended owner detached (their grace starts
    now). Return the directories removed (or, with
    ``dry_run``, that would be; nothing is then marked either).

    A kernel's grace is the one its ``persist`` file recorded at its start, else
    ``grace``, else the default. Blocking: call it in a thread from async code.
    """
    log = log or logger
    with _host_link(ssh) as link:
        removed: list[str] = []
        for kernel in _remote_kernels(link, remote_runtime_dir, command_timeout):
            if not kernel.owner:
                continue
            kernel_grace = _first_set(kernel.grace, grace, DEFAULT_ADOPTION_GRACE)
            verdict = sweep_verdict(kernel.owner, kernel.persisted, kernel_grace)
            if not kernel.alive and (verdict == "mark" or detached_since(kernel.owner) is not None):
                verdict = "remove"  # nothing left to adopt: its process has ended
            if verdict == "mark":
                if not dry_run:
                    link.sh(
                        write_owner_script(kernel.kernel_dir, detached_mark()),
                        timeout=command_timeout,
                    )
                log.info(
                    "Persisted SSH kernel %s on %s outlived its server (%s): detached, "
                    "adoptable for %g s",
                    kernel.kernel_dir,
                    ssh.host,
                    kernel.owner,
                    kernel_grace,
                )
                continue
            if verdict != "remove":
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


def _first_set(*values: float | None) -> float:
    return next(float(v) for v in values if v is not None)


def adoptable_remote_kernels(
    ssh: SSHSettings,
    *,
    remote_runtime_dir: str,
    command_timeout: float,
    kernelspec: str,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> list[tuple[RemoteKernel, dict[str, Any]]]:
    """The kernels of ``kernelspec`` on the host ``ssh`` names that a server may adopt:
    running, persisted, their owner detached or gone
    (:func:`~provisioners.lifecycle.owner.adoptable`); each with its connection file (read
    over SFTP; never logged). A kernel whose connection file cannot be read is left out
    and logged. Blocking: call it in a thread from async code.
    """
    log = log or logger
    with _host_link(ssh) as link:
        found: list[tuple[RemoteKernel, dict[str, Any]]] = []
        for kernel in _remote_kernels(link, remote_runtime_dir, command_timeout):
            if not (
                kernel.alive
                and kernel.persisted
                and kernel.pid is not None
                and kernel.kernelspec == kernelspec
                and adoptable(kernel.owner)
            ):
                continue
            path = posixpath.join(kernel.kernel_dir, "connection.json")
            try:
                with link.sftp(command_timeout) as sftp, sftp.open(path, "rb") as remote:
                    info = json.loads(remote.read())
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:  # no content
                log.warning(
                    "SSH kernel %s on %s is not adoptable: its connection file cannot be read (%s)",
                    kernel.kernel_dir,
                    ssh.host,
                    type(exc).__name__,
                )
                continue
            found.append((kernel, info))
        return found


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

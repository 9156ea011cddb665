"""The SSH target's settings and their checks (the provisioner is in :mod:`.provisioner`).

The kernel is reached through the shared SSH tunnels of every target: ``ssh_server``,
``ssh_key`` and ``ssh_password`` follow this target's ``host``/``port``/``user``/
``key_file``/``password`` (and may not be set themselves), so the tunnels, the remote
commands and SFTP share one SSH connection, built by :meth:`SharedSettings.ssh_settings`.
``ssh_known_hosts``, ``ssh_accept_unknown_host_keys`` and ``ssh_connect_timeout`` apply
to it.
"""

from __future__ import annotations

import getpass
import posixpath
from typing import ClassVar

from traitlets import Bool, Float, Int, Unicode, default

from ..connection.sshlink import format_server
from ..settings import SharedSettings

__all__ = ["DEFAULT_REMOTE_RUNTIME_DIR", "SSHTargetSettings"]

DEFAULT_REMOTE_RUNTIME_DIR = "~/.local/share/jupyter/runtime"


class SSHTargetSettings(SharedSettings):
    """What an SSH kernelspec may set: the host and how to log in, and where the kernel's
    files and working directory are on it."""

    target: ClassVar[str] = "ssh"
    #: 'ssh_password' follows 'password' here (and may not be set itself).
    secret_settings: ClassVar[tuple[str, ...]] = ("password",)
    #: Settings where ``{username}`` stands for the kernel's user (a safe path segment).
    username_settings: ClassVar[tuple[str, ...]] = ("remote_cwd", "env")

    host = Unicode(
        "",
        config=True,
        help="""Host name or IP address of the remote host the kernel runs on (required),
        e.g. 'gpu01.example.org' or '10.0.0.12'. Its host key must be in ssh_known_hosts
        (or ssh_accept_unknown_host_keys be set). The host needs a POSIX sh, the kernel's
        interpreter on the PATH of a non-interactive SSH session (or an absolute argv[0]),
        and SFTP.""",
    )
    port = Int(22, config=True, help="SSH port of the remote host (1-65535), e.g. 2222.")
    user = Unicode(
        "",
        config=True,
        help="""Remote user name the kernel runs as, e.g. 'alice'. Empty: the name of the
        user this server runs as.""",
    )
    key_file = Unicode(
        "",
        config=True,
        help="""Private key file to log in with, e.g. '/home/alice/.ssh/id_ed25519'. Empty:
        the SSH agent's keys, then ~/.ssh/id_*.""",
    )
    password = Unicode(
        "",
        config=True,
        help="""Password to log in with, when keys are not used: a reference, never the
        password itself: 'file:/path' (a file of mode 0600) or 'env:VARIABLE'.""",
    )
    remote_cwd = Unicode(
        "",
        config=True,
        help="""Working directory of the kernel on the remote host, absolute or '~/...',
        e.g. '~/notebooks'. Empty: the user's home. It must exist (the start fails naming
        it otherwise). The server-side cwd of the start request is not used.
        '{username}' stands for the kernel's user (KERNEL_USERNAME) as a safe path
        segment ('../x' becomes 'x--<hash>'), e.g. '/srv/work/{username}'.""",
    )
    remote_runtime_dir = Unicode(
        DEFAULT_REMOTE_RUNTIME_DIR,
        config=True,
        help="""Remote directory (absolute or '~/...') in which each kernel gets a private
        0700 directory 'cluster-kernel-<kernel id>' holding its connection file, launcher,
        owner, pid and log (and, with persist_kernels, a 'persist' file); created when
        missing. Sweeps, adoption and 'list' look here.""",
    )
    command_timeout = Float(
        30.0,
        config=True,
        help="""Seconds each remote command or SFTP operation may take (positive). A host
        that answers more slowly makes the start, poll or removal fail with a TunnelError.""",
    )
    sweep_on_start = Bool(
        True,
        config=True,
        help="""Kill the kernels of dead servers of this machine on the host and remove their
        directories (in remote_runtime_dir), once per process, when the first kernel starts
        there. A kernel started with persist_kernels is marked detached instead, and
        removed only once its adoption_grace (recorded at its start) is over without a
        server adopting it. Kernels of running servers, and of other machines, are never
        touched.""",
    )

    @default("ssh_server")
    def _default_ssh_server(self) -> str:
        return format_server(self.user or getpass.getuser(), self.host, self.port)

    @default("ssh_key")
    def _default_ssh_key(self) -> str:
        return self.key_file

    @default("ssh_password")
    def _default_ssh_password(self) -> str:
        return self.password

    def secret(self, key: str) -> str:
        """As :meth:`SharedSettings.secret`; 'ssh_password' is 'password' here, and a bad
        reference is named as it was set."""
        return super().secret("password" if key == "ssh_password" else key)

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

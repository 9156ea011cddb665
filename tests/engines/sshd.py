"""A throwaway OpenSSH server on 127.0.0.1 for the SSH provisioner tests.

``LoopbackSSHD(tmpdir)`` creates an ed25519 host key, a user key pair and an
``sshd_config`` in ``tmpdir``, starts ``/usr/sbin/sshd -D -e`` on a free high
port and waits until the server sends its SSH banner. The public user key is
the only entry in ``authorized_keys``, which applies to every account, and
``known_hosts`` holds the ``[127.0.0.1]:PORT`` line for the host key, so
clients can verify it strictly. When sshd runs as root, the key is also
offered to other users through ``AuthorizedKeysCommand``, because they cannot
read a private temp dir. PAM and StrictModes are off so that it also
works from a temporary directory. Password logins are off by default; to test
them, pass ``password_auth=True`` and create a user with a password.

    with LoopbackSSHD(tmp_path) as server:
        client.connect(server.host, server.port, server.user,
                       key_filename=str(server.user_key_path))

``stop()`` ends the server and the sessions it is still serving. It deletes
nothing, so the keys and ``sshd.log`` stay available for debugging.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from typing import Any

__all__ = ["LoopbackSSHD", "SSHDError"]

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
# Options that only newer OpenSSH releases know about. Each one is kept only
# if `sshd -t` accepts it. PerSourcePenalties (9.8+) would otherwise block
# 127.0.0.1 after a few failed logins in the negative tests.
OPTIONAL_OPTIONS = ["PerSourcePenalties no"]


class SSHDError(RuntimeError):
    """sshd could not be configured or started."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (the per-connection sshd processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent PID. The command name in field 2 may contain
        # spaces, so split after its closing parenthesis.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    sessions = _children(proc.pid)
    for pid in [proc.pid, *sessions]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class LoopbackSSHD:
    """An sshd that listens on 127.0.0.1, with its keys and config in ``workdir``.

    Attributes that are set once the server is running: ``host``, ``port``,
    ``user``, ``user_key_path`` (private key; ``.pub`` next to it),
    ``host_key_public`` (``"ssh-ed25519 AAAA..."``), ``known_hosts_path``,
    ``config_path`` and ``log_path`` (sshd's output).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        user: str | None = None,
        port: int | None = None,
        password_auth: bool = False,
        extra_config: list[str] | tuple[str, ...] = (),
        startup_timeout: float = 15.0,
        sshd: str = SSHD,
        start: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.user = user or getpass.getuser()
        self.password_auth = password_auth
        self.extra_config = list(extra_config)
        self.startup_timeout = startup_timeout
        self.sshd = sshd
        self._fixed_port = port
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._optional: list[str] = []

        self.host_key_path = self.workdir / "ssh_host_ed25519_key"
        self.user_key_path = self.workdir / "id_ed25519"
        self.authorized_keys_path = self.workdir / "authorized_keys"
        self.known_hosts_path = self.workdir / "known_hosts"
        self.config_path = self.workdir / "sshd_config"
        self.pid_path = self.workdir / "sshd.pid"
        self.log_path = self.workdir / "sshd.log"
        self.host_key_public = ""
        if start:
            self.start()

    # -- setup --------------------------------------------------------------

    def _keygen(self, path: Path, comment: str) -> None:
        # Reuse keys that a previous run in the same directory created.
        if path.exists() and path.with_suffix(".pub").exists():
            return
        ssh_keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
        subprocess.run(
            [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )

    def _write_config(self, optional: list[str]) -> None:
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            *self._keys_command(),
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin yes",
            "PubkeyAuthentication yes",
            f"PasswordAuthentication {'yes' if self.password_auth else 'no'}",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "LogLevel VERBOSE",
            *optional,
        ]
        if os.path.exists(SFTP_SERVER):
            lines.append(f"Subsystem sftp {SFTP_SERVER}")
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")

    def _keys_command(self) -> list[str]:
        # sshd reads AuthorizedKeysFile as the user logging in, who usually
        # cannot enter a private temp dir. A root sshd can hand the same keys
        # to every user with a command that runs as root instead.
        if os.geteuid() != 0:
            return []
        cat = "/bin/cat" if os.path.exists("/bin/cat") else "/usr/bin/cat"
        return [
            f"AuthorizedKeysCommand {cat} {self.authorized_keys_path}",
            "AuthorizedKeysCommandUser root",
        ]

    def _sshd_test(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.sshd, "-t", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def _supported_options(self) -> list[str]:
        """The OPTIONAL_OPTIONS that this sshd accepts."""
        kept = []
        for option in OPTIONAL_OPTIONS:
            self._write_config([*kept, option])
            if self._sshd_test().returncode == 0:
                kept.append(option)
        return kept

    def _prepare(self) -> None:
        if not os.path.exists(self.sshd):
            raise SSHDError(f"{self.sshd} not found (apt-get install -y openssh-server)")
        if any(c.isspace() for c in str(self.workdir)):
            raise SSHDError(f"workdir must not contain whitespace: {self.workdir}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # sshd refuses to start without its privilege separation directory.
        with contextlib.suppress(PermissionError):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._keygen(self.host_key_path, "cluster-provisioners-test-host")
        self._keygen(self.user_key_path, f"{self.user}@cluster-provisioners-test")
        pub = self.user_key_path.with_suffix(".pub").read_text().strip()
        self.authorized_keys_path.write_text(pub + "\n")
        key_type, key_b64 = self.host_key_path.with_suffix(".pub").read_text().split()[:2]
        self.host_key_public = f"{key_type} {key_b64}"
        self._optional = self._supported_options()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> LoopbackSSHD:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._prepare()
        # A free port can be taken by someone else before sshd binds it:
        # try a few times, unless the caller asked for a specific port.
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            self.port = self._fixed_port or _free_port(self.host)
            self._write_config(self._optional)
            test = self._sshd_test()
            if test.returncode != 0:
                raise SSHDError(f"invalid {self.config_path}: {test.stderr.strip()}")
            self._launch()
            try:
                self._wait_ready()
            except SSHDError:
                log = self._log_tail()
                _terminate(self.proc)
                if attempt + 1 < attempts and "Bind to port" in log:
                    continue
                raise SSHDError(f"sshd did not start on port {self.port}:\n{log}") from None
            break
        self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {self.host_key_public}\n")
        return self

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.sshd, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Safety net: stop the server at interpreter exit if nobody did.
        self._finalizer = weakref.finalize(self, _terminate, self.proc)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SSHDError("sshd exited")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    banner = b""
                    while b"\n" not in banner and len(banner) < 256:
                        chunk = sock.recv(256)
                        if not chunk:
                            break
                        banner += chunk
                if banner.startswith(b"SSH-"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SSHDError("timed out waiting for the SSH banner")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kernel_config(self, remote_runtime: Path, **extra: Any) -> dict[str, Any]:
        """Kernelspec config of the SSH provisioner for this sshd, whose "remote" runtime
        dir is ``remote_runtime``; ``extra`` settings are added."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": str(self.user_key_path),
            "ssh_known_hosts": str(self.known_hosts_path),
            "remote_runtime_dir": str(remote_runtime),
            **extra,
        }

    def stop(self) -> None:
        """Stop sshd and its open sessions; files in ``workdir`` are kept."""
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once
            self._finalizer = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LoopbackSSHD:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LoopbackSSHD {self.user}@{self.host}:{self.port} {state}>"

"""``jupyter-provisioners list`` and ``cleanup`` go on past kernelspecs whose engine fails
(a daemon that is gone, a daemon answering 403, an unknown SSH host key, a refused SSH
key), name each one with its cause, still list and clean the healthy one, and exit 1."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import process_start_time, this_hostname
from tests.helpers import KERNEL_TEST_IMAGE, count, start_sshd, write_kernelspec

pytestmark = [pytest.mark.ssh, pytest.mark.docker]


class _ForbiddingDaemon(BaseHTTPRequestHandler):
    """A Docker API that answers the version check and refuses everything else with 403,
    as an authorization plugin does."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.endswith("/version") or self.path.endswith("/_ping"):
            self._reply(200, {"ApiVersion": "1.41", "Version": "24.0.0"})
        else:
            self._reply(403, {"message": "authorization denied by plugin test-authz: forbidden"})

    do_POST = do_DELETE = do_GET

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def forbidding_daemon(tmp_path: Path) -> Iterator[str]:
    """``unix://`` address of a fake Docker daemon that answers 403."""
    path = tmp_path / "forbidden.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _ForbiddingDaemon)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"unix://{path}"
    server.shutdown()
    server.server_close()


def dead_identity() -> tuple[str, str]:
    """A server identity (``host.pid.start``) and a pid line of a process that has ended."""
    proc = subprocess.Popen(["sleep", "30"])
    start = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return f"{this_hostname()}.{proc.pid}.{start}", f"{proc.pid} {start} 1"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return subprocess.run(
        [sys.executable, "-m", "provisioners", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )


def test_list_and_cleanup_go_on_past_failing_engines(
    tmp_path: Path, forbidding_daemon: str, docker_client: Any
) -> None:
    sshd = start_sshd(tmp_path / "sshd")
    try:
        remote_runtime = tmp_path / "remote-runtime"
        orphan = remote_runtime / "cluster-kernel-orphan-of-a-dead-server"
        orphan.mkdir(parents=True, mode=0o700)
        owner, pid_line = dead_identity()
        (orphan / "owner").write_text(owner + "\n")
        (orphan / "pid").write_text(pid_line + "\n")

        empty_known_hosts = tmp_path / "empty_known_hosts"
        empty_known_hosts.write_text("")
        stranger_key = tmp_path / "stranger_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger_key)], check=True
        )
        ssh = sshd.kernel_config(remote_runtime, ssh_connect_timeout=5.0)
        docker = {"image": KERNEL_TEST_IMAGE, "connect_timeout": 2.0}
        kernels = tmp_path / "kernels"
        failing = {
            "a-docker-gone": (
                "cluster-docker-provisioner",
                {**docker, "docker_host": f"unix://{tmp_path}/no-daemon.sock"},
                "unreachable",
            ),
            "b-docker-403": (
                "cluster-docker-provisioner",
                {**docker, "docker_host": forbidding_daemon},
                "403",
            ),
            "c-ssh-unknown-host-key": (
                "cluster-ssh-provisioner",
                {**ssh, "ssh_known_hosts": str(empty_known_hosts)},
                "HostKeyError",
            ),
            "d-ssh-refused-key": (
                "cluster-ssh-provisioner",
                {**ssh, "key_file": str(stranger_key)},
                "SSHAuthenticationError",
            ),
        }
        for name, (provisioner, config, _) in failing.items():
            write_kernelspec(kernels, name, provisioner, config)
        write_kernelspec(kernels, "z-ssh-healthy", "cluster-ssh-provisioner", ssh)
        count("faults injected", "docker", 2)
        count("faults injected", "ssh", 2)

        def check_failures(result: subprocess.CompletedProcess[str]) -> None:
            assert result.returncode == 1, (result.returncode, result.stderr)
            lines = result.stderr.splitlines()
            for name, (_, _, cause) in failing.items():
                assert any(f"'{name}'" in line and cause in line for line in lines), (
                    name,
                    result.stderr,
                )
            assert "'z-ssh-healthy'" not in result.stderr
            assert f"failed for {len(failing)} kernelspec(s)" in result.stderr

        listed = cli("list", "--json", "--kernel-dir", str(kernels))
        check_failures(listed)
        rows = json.loads(listed.stdout)
        orphan_id = orphan.name.removeprefix("cluster-kernel-")
        found = [(r["kernelspec"], r["state"]) for r in rows if r["kernel_id"] == orphan_id]
        assert found == [("z-ssh-healthy", "exited")], rows

        cleaned = cli("cleanup", "--kernel-dir", str(kernels))
        check_failures(cleaned)
        assert f"{orphan} (kernelspec z-ssh-healthy)" in cleaned.stdout, cleaned.stdout
        assert "Removed 1 orphaned resource(s)." in cleaned.stdout
        count("orphans found after sweep", "ssh", int(orphan.exists()))
        assert not orphan.exists()
    finally:
        sshd.stop()

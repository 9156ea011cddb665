"""Every usage example of the seed API document runs with ``provisioners`` imports.

The examples are in ``seed_examples/``, transcribed from the seed document with only
``jupyter_client`` replaced by ``provisioners`` (and re-indented: the seed lost its
indentation). Placeholders that name things outside this machine (a remote server, a
private key, a custom working dir) are filled in by the test; kernels start through our
local provisioner (``provisioners.KernelManager``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from provisioners import KernelManager, write_connection_file
from provisioners.connection.ports import FilePortStore

EXAMPLES = Path(__file__).parent / "seed_examples"


def run_example(
    name: str,
    tmp_path: Path,
    runtime: Path,
    replace: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
):
    source = (EXAMPLES / name).read_text()
    for old, new in (replace or {}).items():
        assert old in source
        source = source.replace(old, new)
    script = tmp_path / name
    script.write_text(source)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), TMPDIR=str(tmp_path), **(env or {}))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _kernels_of(runtime: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ipykernel_launcher" in cmdline and str(runtime) in cmdline:
            found.append(proc)
    return found


def test_write_connection_file(tmp_path: Path, jupyter_dirs: Path) -> None:
    result = run_example("ex1_write_connection_file.py", tmp_path, jupyter_dirs)
    assert result.returncode == 0, result.stderr
    fname = result.stdout.split("Connection file: ")[1].splitlines()[0]
    assert json.loads(Path(fname).read_text())["shell_port"] > 0
    written = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert any(w["shell_port"] == 50001 and w["ip"] == "192.168.1.100" for w in written)


def test_find_connection_file(tmp_path: Path, jupyter_dirs: Path) -> None:
    write_connection_file(str(jupyter_dirs / "kernel-12345.json"))
    result = run_example("ex2_find_connection_file.py", tmp_path, jupyter_dirs)
    assert result.returncode == 0, result.stderr
    assert f"Found connection file: {jupyter_dirs / 'kernel-12345.json'}" in result.stdout


def test_connection_info_through_our_provisioner(tmp_path: Path, jupyter_dirs: Path) -> None:
    result = run_example("ex3_connection_info.py", tmp_path, jupyter_dirs)
    assert result.returncode == 0, result.stderr
    shell_port = int(result.stdout.split("Shell port: ")[1].split()[0])
    assert 20000 <= shell_port <= 29999  # allocated by our cluster-aware cache
    assert "Transport: tcp" in result.stdout
    # the example leaves its kernel running; it exits once its parent is gone,
    # and the port records of the dead parent are reclaimed
    deadline = time.monotonic() + 20
    while _kernels_of(jupyter_dirs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _kernels_of(jupyter_dirs)
    assert FilePortStore(jupyter_dirs).held() == {}


def test_local_port_cache(tmp_path: Path, jupyter_dirs: Path) -> None:
    result = run_example("ex5_local_port_cache.py", tmp_path, jupyter_dirs)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split("Available port: ")[1]) > 0
    assert FilePortStore(jupyter_dirs).held() == {}


def test_channels(tmp_path: Path, jupyter_dirs: Path) -> None:
    result = run_example("ex6_channels.py", tmp_path, jupyter_dirs)
    assert result.returncode == 0, result.stderr
    assert not _kernels_of(jupyter_dirs)


def test_launch_kernel(tmp_path: Path, jupyter_dirs: Path) -> None:
    workdir = tmp_path / "custom-working-dir"
    workdir.mkdir()
    result = run_example(
        "ex7_launch_kernel.py",
        tmp_path,
        jupyter_dirs,
        {"/custom/working/dir": str(workdir)},
    )
    assert result.returncode == 0, result.stderr
    assert "Kernel PID: " in result.stdout and "Kernel is running" in result.stdout
    pid = int(result.stdout.split("Kernel PID: ")[1].split()[0])
    assert not psutil.pid_exists(pid)


@pytest.mark.ssh
def test_tunnel_to_kernel(tmp_path: Path, jupyter_dirs: Path) -> None:
    """The seed's tunnel example, against a loopback sshd, with a local kernel behind it
    standing in for the remote one (the sshd's host is this machine)."""
    from tests.helpers import start_sshd

    sshd = start_sshd(tmp_path / "sshd")
    km = KernelManager()
    km.start_kernel()
    try:
        info = km.get_connection_info()
        info["key"] = info["key"].decode()
        (jupyter_dirs / "kernel-remote.json").write_text(json.dumps(info))
        result = run_example(
            "ex4_tunnel_to_kernel.py",
            tmp_path,
            jupyter_dirs,
            {
                "user@remote-server.com": f"{sshd.user}@127.0.0.1:{sshd.port}",
                "/path/to/private_key": str(sshd.user_key_path),
            },
            env={"CLUSTER_PROVISIONERS_SSH_KNOWN_HOSTS": str(sshd.known_hosts_path)},
        )
        assert result.returncode == 0, result.stderr
        ports = result.stdout.split("Local tunnel ports: ")[1].strip(" ()\n").split(",")
        assert len(ports) == 5 and all(int(p) > 0 for p in ports)
    finally:
        km.shutdown_kernel(now=True)
        sshd.stop()

"""Docker on "another host": the daemon reached as DOCKER_HOST=ssh://…, the kernel's
channels tunnelled through the same SSH server. The other host is this machine behind a
loopback sshd. The daemon's SSH connection uses the kernelspec's SSH settings (key,
ssh_known_hosts, host-key policy), never docker-py's ~/.ssh defaults."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from provisioners.docker import DockerClusterProvisioner
from provisioners.exceptions import ForwardingRefusedError, HostKeyError
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, count, execute, start_sshd

pytestmark = [pytest.mark.ssh, pytest.mark.docker]


async def test_docker_daemon_over_ssh_with_tunnelled_channels(
    kernel_manager: Any, sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI (for 'docker system dial-stdio' over ssh) is missing")
    docker = pytest.importorskip("docker")
    try:
        docker.from_env(timeout=5).images.get(KERNEL_TEST_IMAGE)
    except Exception as exc:
        from tests.helpers import skip_or_fail

        skip_or_fail("docker", f"no local Docker engine with {KERNEL_TEST_IMAGE}: {exc}")
    # docker-py's defaults would find nothing here: no key, no known_hosts, no config
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    server = f"{sshd.user}@127.0.0.1:{sshd.port}"
    km = kernel_manager(
        "cluster-docker-provisioner",
        {
            "image": KERNEL_TEST_IMAGE,
            "docker_host": f"ssh://{server}",
            "ssh_server": server,
            "ssh_key": str(sshd.user_key_path),
            "ssh_known_hosts": str(sshd.known_hosts_path),
            "fallback": "none",
        },
        argv=CONTAINER_ARGV,
    )
    await km.start_kernel()
    try:
        state = km.provisioner.engine.kernel_state()
        assert state["docker_host"].startswith("ssh://")
        client_side = km.get_connection_info()
        assert client_side["ip"] == "127.0.0.1"
        # the client talks to local tunnel ports, not to the ports published on the host
        published = {km.provisioner.engine.kernel_info[p] for p in ("shell_port", "iopub_port")}
        assert not published & {client_side["shell_port"], client_side["iopub_port"]}
        out = await execute(km, "import socket; print(socket.gethostname())")
        assert out["stdout"].strip() == state["container_id"][:12]
    finally:
        await km.shutdown_kernel()
    left = docker.from_env().containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={km.kernel_id}"}
    )
    assert left == []
    count("docker daemons reached with our SSH settings", "docker")


async def test_container_ip_through_ssh_tunnels(kernel_manager: Any, sshd: Any) -> None:
    """connect_via_container_ip with ssh_server: nothing is published, the tunnels reach
    the container's IP as the SSH server sees it, and the kernel answers through them."""
    docker = pytest.importorskip("docker")
    try:
        docker.from_env(timeout=5).images.get(KERNEL_TEST_IMAGE)
    except Exception as exc:
        from tests.helpers import skip_or_fail

        skip_or_fail("docker", f"no local Docker engine with {KERNEL_TEST_IMAGE}: {exc}")
    km = kernel_manager(
        "cluster-docker-provisioner",
        {
            "image": KERNEL_TEST_IMAGE,
            "connect_via_container_ip": True,
            "ssh_server": f"{sshd.user}@127.0.0.1:{sshd.port}",
            "ssh_key": str(sshd.user_key_path),
            "ssh_known_hosts": str(sshd.known_hosts_path),
            "fallback": "none",
        },
        argv=CONTAINER_ARGV,
    )
    await km.start_kernel()
    try:
        state = km.provisioner.engine.kernel_state()
        assert state["container_ip"], "the start ended without the container's IP"
        container = docker.from_env().containers.get(state["container_id"])
        assert not any(container.attrs["NetworkSettings"]["Ports"].values())  # nothing published
        assert km.get_connection_info()["ip"] == "127.0.0.1"
        out = await execute(km, "import socket; print(socket.gethostname())", timeout=30)
        assert out["stdout"].strip() == state["container_id"][:12]
    finally:
        await km.shutdown_kernel()
    left = docker.from_env().containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={km.kernel_id}"}
    )
    assert left == []


async def test_docker_daemon_over_ssh_checks_our_known_hosts(
    kernel_manager: Any, sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~/.ssh/known_hosts lists the host (docker-py would trust it), ssh_known_hosts does
    not: the start is refused with a host-key error, without falling back; with
    ssh_accept_unknown_host_keys the same daemon is used."""
    pytest.importorskip("docker")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.known_hosts_path, home / ".ssh" / "known_hosts")
    (home / ".ssh" / "config").write_text(f"Host 127.0.0.1\n  IdentityFile {sshd.user_key_path}\n")
    monkeypatch.setenv("HOME", str(home))
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    server = f"{sshd.user}@127.0.0.1:{sshd.port}"
    config = {
        "image": KERNEL_TEST_IMAGE,
        "docker_host": f"ssh://{server}",
        "ssh_server": server,
        "ssh_key": str(sshd.user_key_path),
        "ssh_known_hosts": str(empty),
    }
    km = kernel_manager("cluster-docker-provisioner", config, argv=CONTAINER_ARGV)
    with pytest.raises(HostKeyError):
        await km.start_kernel()
    assert not km.has_kernel
    # The daemon's own connection (no tunnel involved) checks ssh_known_hosts too.
    daemon_only = DockerClusterProvisioner(kernel_id="known-hosts-check", **config)
    with pytest.raises(HostKeyError, match="not in " + str(empty)):
        await daemon_only.check_engine()
    count("docker daemons reached with our SSH settings", "docker")

    accepting = kernel_manager(
        "cluster-docker-provisioner",
        {**config, "ssh_accept_unknown_host_keys": True, "fallback": "none"},
        argv=CONTAINER_ARGV,
    )
    await accepting.start_kernel()
    try:
        assert not accepting.provisioner.engine.fallback_for  # not a fallback
        assert (await execute(accepting, "print(1 + 1)"))["stdout"] == "2\n"
    finally:
        await accepting.shutdown_kernel()


async def test_an_sshd_refusing_forwarding_fails_a_docker_start_by_name(
    kernel_manager: Any, tmp_path: Path
) -> None:
    """Behind an sshd with 'AllowTcpForwarding no' the start fails naming the cause, and
    the container is removed."""
    docker = pytest.importorskip("docker")
    try:
        docker.from_env(timeout=5).images.get(KERNEL_TEST_IMAGE)
    except Exception as exc:
        from tests.helpers import skip_or_fail

        skip_or_fail("docker", f"no local Docker engine with {KERNEL_TEST_IMAGE}: {exc}")
    refusing = start_sshd(
        tmp_path / "no-forwarding", extra_config=["Match all", "    AllowTcpForwarding no"]
    )
    try:
        km = kernel_manager(
            "cluster-docker-provisioner",
            {
                "image": KERNEL_TEST_IMAGE,
                "ssh_server": f"{refusing.user}@127.0.0.1:{refusing.port}",
                "ssh_key": str(refusing.user_key_path),
                "ssh_known_hosts": str(refusing.known_hosts_path),
                "fallback": "none",
            },
            argv=CONTAINER_ARGV,
        )
        with pytest.raises(ForwardingRefusedError, match="AllowTcpForwarding"):
            await km.start_kernel()
    finally:
        refusing.stop()
    left = docker.from_env().containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={km.kernel_id}"}
    )
    assert left == []

"""Kernels in containers of the offline test image, driven by jupyter_client and nbclient."""

from __future__ import annotations

import asyncio
import json
import logging

import docker
import nbformat
import pytest
from nbclient import NotebookClient

from provisioners.connection.files import PORT_NAMES
from provisioners.connection.ports import ClusterPortCache
from provisioners.docker import LABEL_OWNER, LABEL_PORTS, DockerClusterProvisioner
from provisioners.lifecycle.owner import ServerIdentity
from tests.helpers import count, execute, interrupt_busy_loop, reattached_manager

pytestmark = pytest.mark.docker


async def test_execute_notebook_and_inspect(docker_kernels, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="traitlets")
    caplog.set_level(logging.DEBUG, logger="provisioners")
    make, tracker = docker_kernels
    km = make(env={"FROM_SPEC": "spec"})
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 6 * 7"),
            nbformat.v4.new_code_cell("import os; print(x, os.environ['FROM_SPEC'])"),
            nbformat.v4.new_code_cell("print(os.getuid(), os.path.exists('/.dockerenv'))"),
        ]
    )
    client = NotebookClient(nb, km=km, timeout=60)
    async with client.async_setup_kernel():
        assert isinstance(km.provisioner, DockerClusterProvisioner)
        for index, cell in enumerate(nb.cells):
            await client.async_execute_cell(cell, index)

        prov = km.provisioner
        engine = prov.engine
        container = tracker.client.containers.get(engine.container_id)
        attrs = container.attrs
        key = km.session.key.decode()
        # no HMAC key anywhere in `docker inspect`, nor in the container's log
        assert key not in json.dumps(attrs)
        assert key not in container.logs().decode(errors="replace")
        assert key not in caplog.text
        assert attrs["Config"]["Labels"][LABEL_OWNER] == str(ServerIdentity.current())
        # published on 127.0.0.1 only, each port on itself
        info = km.get_connection_info()
        ports = sorted(info[n] for n in PORT_NAMES)
        assert attrs["Config"]["Labels"][LABEL_PORTS] == ",".join(map(str, engine.ports))
        bindings = attrs["HostConfig"]["PortBindings"]
        assert sorted(int(p.split("/")[0]) for p in bindings) == ports
        for port, bound in bindings.items():
            assert bound == [{"HostIp": "127.0.0.1", "HostPort": port.split("/")[0]}]
        published = attrs["NetworkSettings"]["Ports"]
        assert {b["HostIp"] for v in published.values() for b in v} == {"127.0.0.1"}
        # the connection file: the kernel's own, private, in a private directory
        path = engine.kernel_connection_file()
        code, stat = container.exec_run(["stat", "-c", "%a %u", path, path.rsplit("/", 1)[0]])
        assert code == 0
        (file_mode, file_uid), (dir_mode, dir_uid) = (
            line.split() for line in stat.decode().splitlines()
        )
        assert (file_mode, file_uid, dir_uid) == ("600", "0", "0")
        assert int(dir_mode, 8) & 0o777 == 0o700  # ipykernel adds the sticky bit

    await km.shutdown_kernel()  # nbclient leaves a kernel manager it was given running
    assert nb.cells[1].outputs[0]["text"] == "42 spec\n"
    assert nb.cells[2].outputs[0]["text"] == "0 True\n"  # root, in a container
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}


async def test_interrupt_restart_shutdown(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make(interrupt_mode="signal")
    await km.start_kernel()
    await interrupt_busy_loop(km)  # SIGINT to the container's PID 1, the kernel
    km.kernel_spec.interrupt_mode = "message"
    await interrupt_busy_loop(km)  # interrupt_request on the control channel

    first = km.provisioner.engine.container_id
    ports = {n: km.get_connection_info()[n] for n in PORT_NAMES}
    await km.restart_kernel()
    assert km.provisioner.engine.container_id != first
    with pytest.raises(docker.errors.NotFound):
        tracker.client.containers.get(first)
    assert {n: km.get_connection_info()[n] for n in PORT_NAMES} == ports
    assert (await execute(km, "print('after restart')"))["stdout"] == "after restart\n"

    await km.shutdown_kernel()
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "bare-ip"])
async def test_container_ip_mode(docker_kernels, relay: bool) -> None:
    make, _ = docker_kernels
    km = make(
        {
            "network": "bridge",
            "connect_via_container_ip": True,
            "container_ip_relay": relay,
            "user": "jovyan",
        }
    )
    await km.start_kernel()
    prov = km.provisioner.engine
    info = km.get_connection_info()
    kernel_ports = [prov.kernel_info[n] for n in PORT_NAMES]
    if relay:  # local listeners that follow the container across restarts
        assert info["ip"] == "127.0.0.1" != prov.container_ip
        assert prov.relay.relay.target == (prov.container_ip, kernel_ports)
    else:
        assert info["ip"] == prov.container_ip != "127.0.0.1"
        assert [info[n] for n in PORT_NAMES] == kernel_ports
    attrs = await asyncio.to_thread(prov.client.api.inspect_container, prov.container_id)
    assert not attrs["HostConfig"]["PortBindings"]
    out = await execute(km, "import os; print(os.getuid())")
    assert out["stdout"] == "1000\n"
    await km.shutdown_kernel(now=True)
    assert prov.relay is None


async def test_provisioner_info_reconnects(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make()
    await km.start_kernel()
    await execute(km, "state = 'kept'")
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
    assert info["target"] == "docker" and info["state"]["container_id"]

    # a fresh KernelManager adopts the rebuilt provisioner: it runs code and stops the kernel
    km2 = await reattached_manager(km, info)
    assert (await execute(km2, "print(state)"))["stdout"] == "kept\n"
    await km2.shutdown_kernel(now=True)
    assert tracker.containers(km.kernel_id) == []
    await km.shutdown_kernel(now=True)  # the original manager copes with a gone container
    assert ClusterPortCache.instance().held() == {}


_PRIVILEGES = (
    "import re; s = open('/proc/self/status').read(); "
    "print(re.search(r'CapEff:\\s*(\\w+)', s)[1], re.search(r'NoNewPrivs:\\s*(\\d)', s)[1], "
    "open('/sys/fs/cgroup/pids.max').read().strip() if __import__('os').path.exists("
    "'/sys/fs/cgroup/pids.max') else open('/sys/fs/cgroup/pids/pids.max').read().strip())"
)


async def test_kernel_container_is_locked_down_by_default(docker_kernels, docker_client) -> None:
    """A stock ipykernel runs with no capabilities, no-new-privileges and a pids limit;
    each of the three can be turned off."""
    make, _ = docker_kernels
    km = make()
    await km.start_kernel()
    try:
        container = docker_client.containers.get(km.provisioner.engine.container_id)
        host = container.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"], host["CapDrop"]
        assert "no-new-privileges:true" in (host["SecurityOpt"] or [])
        assert host["PidsLimit"] == 4096
        out = await execute(km, _PRIVILEGES)
        assert out["stdout"].split() == ["0000000000000000", "1", "4096"], out
        await interrupt_busy_loop(km)  # SIGINT still reaches a kernel without capabilities
        count("container lockdowns checked", "docker")
    finally:
        await km.shutdown_kernel()

    loose = make({"cap_drop": [], "no_new_privileges": False, "pids_limit": 0})
    await loose.start_kernel()
    try:
        cap_eff, no_new_privs, pids_max = (await execute(loose, _PRIVILEGES))["stdout"].split()
        assert cap_eff != "0000000000000000" and no_new_privs == "0" and pids_max == "max"
    finally:
        await loose.shutdown_kernel()

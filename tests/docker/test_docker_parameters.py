"""Launch parameters on real Docker kernels: the container gets the resources the start
request chose, other parameters reach the kernel's env, a bad value leaves nothing."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from provisioners.connection.ports import ClusterPortCache
from provisioners.parameters import LaunchBounds, LaunchParameterError
from provisioners.persist import adopt_kernels
from provisioners.targets import provisioner_for
from tests.helpers import KERNEL_TEST_IMAGE, execute, reattached_manager

pytestmark = pytest.mark.docker

PARAMETERS = {
    "cpu": {"type": "number", "minimum": 0.25, "maximum": 2, "default": 1},
    "memory": {"type": "string", "minimum": "128Mi", "maximum": "1Gi", "default": "512Mi"},
    "image": {"type": "string", "enum": [KERNEL_TEST_IMAGE], "default": KERNEL_TEST_IMAGE},
    "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
}


@pytest.fixture(autouse=True)
def fresh_bounds():
    """No admin bounds from another test."""
    LaunchBounds.clear_instance()
    yield
    LaunchBounds.clear_instance()


async def test_the_container_gets_the_requested_cpu_and_memory(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make(metadata={"parameters": PARAMETERS})
    env = {"KERNEL_CPU": "0.5", "KERNEL_MEMORY": "256Mi", "KERNEL_MODE": "exact"}
    await km.start_kernel(env=env)
    engine = km.provisioner.engine
    attrs = await asyncio.to_thread(tracker.client.api.inspect_container, engine.container_id)
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == 256 * 2**20
    code = "import os; print(os.environ['KERNEL_MODE'], os.environ['KERNEL_CPU'])"
    assert (await execute(km, code))["stdout"] == "exact 0.5\n"
    assert km.provisioner.launch_parameters.changed == ("cpu", "memory", "mode")
    # a restart keeps this kernel's parameters
    await km.restart_kernel()
    engine = km.provisioner.engine
    attrs = await asyncio.to_thread(tracker.client.api.inspect_container, engine.container_id)
    assert (attrs["HostConfig"]["NanoCpus"], attrs["HostConfig"]["Memory"]) == (5e8, 2**28)
    await km.shutdown_kernel(now=True)


async def test_defaults_apply_and_another_kernel_of_the_spec_is_unchanged(
    docker_kernels,
) -> None:
    make, tracker = docker_kernels
    small = make(metadata={"parameters": PARAMETERS}, name="shared-spec")
    plain = make(metadata={"parameters": PARAMETERS}, name="shared-spec")
    await asyncio.gather(small.start_kernel(env={"KERNEL_CPU": "0.25"}), plain.start_kernel(env={}))
    found = {}
    for km in (small, plain):
        cid = km.provisioner.engine.container_id
        attrs = await asyncio.to_thread(tracker.client.api.inspect_container, cid)
        found[km.kernel_id] = (attrs["HostConfig"]["NanoCpus"], attrs["HostConfig"]["Memory"])
    assert found[small.kernel_id] == (250_000_000, 512 * 2**20)
    assert found[plain.kernel_id] == (1_000_000_000, 512 * 2**20)  # the schema's defaults
    out = await execute(plain, "import os; print(os.environ.get('KERNEL_MODE'))")
    assert out["stdout"] == "fast\n"  # a default is exported too


@pytest.mark.parametrize(
    ("env", "parameter"),
    [
        ({"KERNEL_CPU": "2; rm -rf /"}, "cpu"),
        ({"KERNEL_CPU": "1e309"}, "cpu"),
        ({"KERNEL_MEMORY": "9999Ti"}, "memory"),
        ({"KERNEL_IMAGE": "alpine:latest"}, "image"),
    ],
)
async def test_a_bad_value_fails_fast_and_leaves_nothing(
    docker_kernels, env: dict[str, str], parameter: str
) -> None:
    make, tracker = docker_kernels
    km = make(metadata={"parameters": PARAMETERS})
    began = time.monotonic()
    with pytest.raises(LaunchParameterError) as caught:
        await km.start_kernel(env=env)
    assert time.monotonic() - began < 5
    assert caught.value.parameter == parameter and caught.value.status_code == 400
    assert f"launch parameter {parameter!r}" in str(caught.value)
    tracker.kernel_ids.add(km.kernel_id)
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}


async def test_admin_bounds_apply_on_top_of_the_schema(docker_kernels) -> None:
    LaunchBounds.instance().max_cpu = 0.5
    make, tracker = docker_kernels
    km = make(metadata={"parameters": PARAMETERS})
    with pytest.raises(LaunchParameterError, match="max_cpu") as caught:
        await km.start_kernel(env={"KERNEL_CPU": "1.5"})  # the schema allows 2
    assert caught.value.parameter == "cpu"
    # the kernelspec's default (1) is above the bound too: a start must ask for less
    with pytest.raises(LaunchParameterError, match="max_cpu"):
        await km.start_kernel(env={})
    assert tracker.containers(km.kernel_id) == []
    await km.start_kernel(env={"KERNEL_CPU": "0.5"})
    cid = km.provisioner.engine.container_id
    attrs = await asyncio.to_thread(tracker.client.api.inspect_container, cid)
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert (await execute(km, "print(1 + 1)"))["stdout"] == "2\n"


async def test_a_reattached_kernel_keeps_its_parameters_for_its_restarts(docker_kernels) -> None:
    """Another server process reconnects from the provisioner info: its provisioner has
    this kernel's settings again, which a restart uses (see the first test). (jupyter_client
    cannot restart a manager it did not start itself, so the restart is not run here.)"""
    make, _ = docker_kernels
    km = make(metadata={"parameters": PARAMETERS})
    await km.start_kernel(env={"KERNEL_CPU": "0.5", "KERNEL_MODE": "exact"})
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
    assert info["launch_env"]["KERNEL_CPU"] == "0.5"
    again = await reattached_manager(km, info)
    prov = again.provisioner
    assert (prov.cpu_limit, prov.memory_limit) == (0.5, str(512 * 2**20))
    assert prov.env["KERNEL_MODE"] == "exact"
    assert prov.launch_parameters.changed == ("cpu", "mode")
    assert (await execute(again, "print('still here')"))["stdout"] == "still here\n"
    await again.shutdown_kernel(now=True)


async def test_an_adopted_kernel_restarts_with_its_parameters(
    docker_kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, tracker = docker_kernels
    km = make({"persist_kernels": True, "adoption_grace": 600}, metadata={"parameters": PARAMETERS})
    await km.start_kernel(env={"KERNEL_CPU": "0.5", "KERNEL_MODE": "exact"})
    assert await km.provisioner.detach()  # the server stops; the kernel lives on

    kernel_dir = Path(km.kernel_spec.resource_dir).parent
    spec = KernelSpecManager(kernel_dirs=[str(kernel_dir)]).get_kernel_spec(km.kernel_name)
    (record,) = await provisioner_for(spec).adoptable_kernels()
    assert record["launch_env"] == {"KERNEL_CPU": "0.5", "KERNEL_MODE": "exact"}

    # a fresh server adopts it; a restart (a new container, no start request) keeps them
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir.parent))
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    assert await adopt_kernels(mkm) == [km.kernel_id]
    adopted = mkm.get_kernel(km.kernel_id)
    await mkm.restart_kernel(km.kernel_id)
    cid = adopted.provisioner.engine.container_id
    attrs = await asyncio.to_thread(tracker.client.api.inspect_container, cid)
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    code = "import os; print(os.environ['KERNEL_MODE'])"
    assert (await execute(dict(adopted.get_connection_info()), code))["stdout"] == "exact\n"
    await mkm.shutdown_kernel(km.kernel_id, now=True)
    assert tracker.containers(km.kernel_id) == []

"""Docker kernels that outlive their server (``persist_kernels``): detached by a server that
stops, or left by one that died, then adopted by a fresh server that reads the kernel's
state back; swept once their adoption grace has passed; warm kernels are never adopted."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from provisioners.docker import LABEL_KERNEL_ID, sweep_orphans
from provisioners.docker.daemon import (
    LABEL_GRACE,
    LABEL_PERSIST,
    LABEL_POOL_PREFIX,
    container_kernel_dir,
    listed_kernel_id,
    write_owner,
)
from provisioners.lifecycle.owner import (
    DETACHED_PREFIX,
    ServerIdentity,
    detached_mark,
    detached_since,
)
from provisioners.persist import adopt_kernels
from provisioners.pool import KernelPools
from provisioners.targets import provisioner_for
from tests.helpers import (
    CONTAINER_ARGV,
    DOCKER_PROVISIONER,
    KERNEL_TEST_IMAGE,
    REPO,
    async_wait_for,
    cli_env,
    execute,
    write_kernelspec,
)
from tests.helpers.pool import FILL_TIMEOUT, claimed, fill, ready, spec_containers

pytestmark = pytest.mark.docker

LOG = logging.getLogger("test-persist")

#: A "server": starts a kernel of each (kernelspec, kernel id) pair of its arguments and
#: sets ``x`` in it, fills the warm pool of the kernelspec after ``--pool`` (if any),
#: says STARTED, then waits to be killed.
SERVER = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from tests.helpers import async_wait_for, execute
from tests.helpers.pool import FILL_TIMEOUT, fill, ready

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    args = sys.argv[2:]
    pooled = args[args.index("--pool") + 1] if "--pool" in args else ""
    pairs = args[: args.index("--pool")] if pooled else args
    managers = []
    for name, kernel_id in zip(pairs[::2], pairs[1::2]):
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        await km.start_kernel(kernel_id=kernel_id)
        out = await execute(km, f"x = 'set by the dead server in {name}'; print('ok')")
        assert out["stdout"] == "ok\\n", out
        managers.append(km)
    if pooled:
        km = AsyncKernelManager(kernel_name=pooled, kernel_spec_manager=ksm)
        fill(km)
        await async_wait_for(ready(pooled, 1), FILL_TIMEOUT, "a warm kernel")
    print("STARTED", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def owner_record(client: docker.DockerClient, item: dict[str, Any]) -> str:
    """The owner file a server wrote into a kernel container ('' when none)."""
    dir_id = (item.get("Labels") or {})[LABEL_KERNEL_ID]
    path = f"{container_kernel_dir(dir_id)}/owner"
    try:
        stream, _ = client.api.get_archive(item["Id"], path)
    except docker.errors.NotFound:
        return ""
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile("owner")
        return member.read().decode().strip() if member is not None else ""


async def adoptable(kernel_dir: Path, spec_name: str) -> list[dict[str, Any]]:
    """The provisioner infos a fresh server's template provisioner of ``spec_name`` finds."""
    spec = KernelSpecManager(kernel_dirs=[str(kernel_dir)]).get_kernel_spec(spec_name)
    records = await provisioner_for(spec).adoptable_kernels()
    return list(records)


def fresh_server(kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncMultiKernelManager:
    """The kernel manager of a server started after the one that left its kernels
    (``kernel_dir``, a ``kernels`` directory, is on its Jupyter path)."""
    assert kernel_dir.name == "kernels"
    # adopt_kernel builds each kernel manager without the server's kernelspec manager (as
    # MultiKernelManager passes it), so the kernelspecs must be on the Jupyter path too
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir.parent))
    return AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )


#: Published ports; the container's IP through local relays, as a non-root user.
MODES = {
    "published": {},
    "container-ip-relay": {"network": "bridge", "connect_via_container_ip": True, "user": "jovyan"},
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_a_detached_kernel_is_adopted_by_a_fresh_server_with_its_state(
    docker_kernels: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    make, tracker = docker_kernels
    km = make({"persist_kernels": True, "adoption_grace": 600, **MODES[mode]})
    await km.start_kernel()
    assert (await execute(km, "x = 6 * 7; print('set')"))["stdout"] == "set\n"
    engine = km.provisioner.engine
    ports, key = list(engine.ports), km.session.key
    (item,) = tracker.containers(km.kernel_id)
    assert item["Labels"][LABEL_PERSIST] == "true"
    assert item["Labels"][LABEL_GRACE] == "600"

    # the server stops: the kernel is detached, not shut down
    assert await km.provisioner.detach()
    assert not km.has_kernel
    assert engine.relay is None and engine.client is None  # let go of, not stopped
    (item,) = tracker.containers(km.kernel_id)
    assert item["State"] == "running"
    assert owner_record(tracker.client, item).startswith(DETACHED_PREFIX)

    kernel_dir = Path(km.kernel_spec.resource_dir).parent
    (record,) = await adoptable(kernel_dir, km.kernel_name)
    assert record["kernel_id"] == km.kernel_id
    assert record["ports"] == ports and record["port_host"] == "localhost"
    assert record["kernel_info"]["key"] == key.decode()
    assert record["state"]["container_id"] == item["Id"]
    assert record["state"]["dir_id"] == km.kernel_id

    # a fresh server adopts it under the same id; a new client reads the variable back
    mkm = fresh_server(kernel_dir, monkeypatch)
    assert await adopt_kernels(mkm) == [km.kernel_id]
    adopted = mkm.get_kernel(km.kernel_id)
    assert adopted.session.key == key
    if mode == "container-ip-relay":  # reached through a relay of its own again
        assert adopted.provisioner.engine.relay is not None
        assert adopted.get_connection_info()["ip"] == "127.0.0.1"
    out = await execute(dict(adopted.get_connection_info()), "print(x)")
    assert out["stdout"] == "42\n", out
    # adoption took ownership back: this live server's, no longer adoptable nor swept
    assert owner_record(tracker.client, item) == str(ServerIdentity.current())
    assert await adoptable(kernel_dir, km.kernel_name) == []
    assert item["Id"] not in await asyncio.to_thread(sweep_orphans, tracker.client, LOG)
    await mkm.shutdown_kernel(km.kernel_id, now=True)
    assert tracker.containers(km.kernel_id) == []


async def test_the_sweep_keeps_a_detached_kernel_for_its_grace_then_removes_it(
    docker_kernels: Any,
) -> None:
    make, tracker = docker_kernels
    grace = 3.0
    km = make({"persist_kernels": True, "adoption_grace": grace})
    await km.start_kernel()
    assert await km.provisioner.detach()
    (item,) = tracker.containers(km.kernel_id)
    since = detached_since(owner_record(tracker.client, item))
    assert since is not None

    # inside the grace: kept, by a sweep with the kernelspec's settings and by one without
    template = provisioner_for(km.kernel_spec)
    assert not any(item["Id"][:12] in r for r in await template.sweep_orphans())
    assert item["Id"] not in await asyncio.to_thread(sweep_orphans, tracker.client, LOG)
    # a server of another kernelspec applies its own (here: no) grace to its own only
    other = await asyncio.to_thread(sweep_orphans, tracker.client, LOG, 0.0, "another-spec")
    assert item["Id"] not in other
    assert [c["State"] for c in tracker.containers(km.kernel_id)] == ["running"]

    await asyncio.sleep(max(0.0, since + grace + 1 - time.time()))
    # a server whose own grace is longer keeps it still
    kept = await asyncio.to_thread(sweep_orphans, tracker.client, LOG, 3600.0)
    assert item["Id"] not in kept
    # past its grace: removed (the container's own grace label, as a CLI sweep reads it)
    removed = await asyncio.to_thread(sweep_orphans, tracker.client, LOG)
    assert item["Id"] in removed
    assert tracker.containers(km.kernel_id) == []
    kernel_dir = Path(km.kernel_spec.resource_dir).parent
    assert await adoptable(kernel_dir, km.kernel_name) == []


async def test_a_dead_servers_persisted_kernel_is_marked_and_adopted_its_others_removed(
    docker_kernels: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tracker = docker_kernels
    client = tracker.client
    tag = uuid.uuid4().hex[:8]
    persisted, plain, warm = f"persist-{tag}", f"plain-{tag}", f"warm-{tag}"
    kernel_dir = tmp_path / "server" / "kernels"
    base = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False}
    for name, config in (
        (persisted, {"persist_kernels": True}),
        (plain, {}),
        (warm, {"persist_kernels": True, "pool_size": 1}),
    ):
        write_kernelspec(
            kernel_dir, name, DOCKER_PROVISIONER, {**base, **config}, argv=CONTAINER_ARGV
        )
    kept_id, plain_id = str(uuid.uuid4()), str(uuid.uuid4())
    tracker.kernel_ids |= {kept_id, plain_id}
    args = [str(kernel_dir), persisted, kept_id, plain, plain_id, "--pool", warm]
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=cli_env(),
    )
    try:
        try:
            line = await asyncio.wait_for(server.stdout.readline(), FILL_TIMEOUT + 120)
        finally:
            server.send_signal(signal.SIGKILL)
            await server.wait()
        assert line.strip() == b"STARTED", line
        (warm_item,) = spec_containers(client, warm)
        assert warm_item["Labels"][LABEL_PERSIST] == "true"
        assert LABEL_POOL_PREFIX in warm_item["Labels"]
        (kept,) = tracker.containers(kept_id)

        # its server is gone: the persisted kernel is adoptable at once, the warm one never
        (record,) = await adoptable(kernel_dir, persisted)
        assert record["kernel_id"] == kept_id
        assert await adoptable(kernel_dir, warm) == []
        assert await adoptable(kernel_dir, plain) == []

        # the sweep removes the plain and the warm kernel, and marks the persisted one
        removed = await asyncio.to_thread(sweep_orphans, client, LOG)
        assert kept["Id"] not in removed
        assert {c["Id"] for c in tracker.containers(plain_id)} <= set(removed)
        assert tracker.containers(plain_id) == []
        assert spec_containers(client, warm) == []
        assert owner_record(client, kept).startswith(DETACHED_PREFIX)
        assert [c["State"] for c in tracker.containers(kept_id)] == ["running"]

        # a fresh server adopts it, with the variable the dead server set
        mkm = fresh_server(kernel_dir, monkeypatch)
        assert await adopt_kernels(mkm) == [kept_id]
        info = dict(mkm.get_kernel(kept_id).get_connection_info())
        out = await execute(info, "print(x)")
        assert out["stdout"] == f"set by the dead server in {persisted}\n", out
        await mkm.shutdown_kernel(kept_id, now=True)
    finally:
        for item in spec_containers(client, warm):
            client.api.remove_container(item["Id"], force=True, v=True)


@pytest.fixture
async def kernel_pools() -> AsyncIterator[KernelPools]:
    """A fresh ``KernelPools`` for the test, drained after it."""
    KernelPools.clear_instance()
    pools = KernelPools.instance()
    yield pools
    await pools.drain()
    KernelPools.clear_instance()


async def test_a_claimed_warm_kernel_is_adopted_and_the_pools_warm_one_is_not(
    docker_kernels: Any,
    docker_client: docker.DockerClient,
    kernel_pools: KernelPools,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, _ = docker_kernels
    km = make({"persist_kernels": True, "pool_size": 1})
    spec_name = km.kernel_name
    try:
        fill(km)
        await async_wait_for(ready(spec_name, 1), FILL_TIMEOUT, "a warm kernel")
        await km.start_kernel(kernel_id=km.kernel_id)
        assert claimed(km)
        assert (await execute(km, "x = 'claimed'; print('ok')"))["stdout"] == "ok\n"
        assert await km.provisioner.detach()
        await async_wait_for(ready(spec_name, 1), FILL_TIMEOUT, "the pool to refill")
        # the refilled warm kernel is no one's to adopt, even marked detached (as a
        # pool's own kernel never is: a stopping server drains its pools)
        listed = spec_containers(docker_client, spec_name)
        (warm,) = [c for c in listed if listed_kernel_id(c["Labels"], c["Names"][0])[1]]
        assert warm["Labels"][LABEL_PERSIST] == "true"
        dir_id = warm["Labels"][LABEL_KERNEL_ID]
        write_owner(docker_client, warm["Id"], dir_id, detached_mark())
        kernel_dir = Path(km.kernel_spec.resource_dir).parent
        (record,) = await adoptable(kernel_dir, spec_name)
        assert record["kernel_id"] == km.kernel_id
        assert record["state"]["dir_id"].startswith("pool-")

        mkm = fresh_server(kernel_dir, monkeypatch)
        assert await adopt_kernels(mkm) == [km.kernel_id]
        out = await execute(dict(mkm.get_kernel(km.kernel_id).get_connection_info()), "print(x)")
        assert out["stdout"] == "claimed\n", out
        await mkm.shutdown_kernel(km.kernel_id, now=True)
    finally:
        await kernel_pools.drain()
        for item in spec_containers(docker_client, spec_name):
            docker_client.api.remove_container(item["Id"], force=True, v=True)

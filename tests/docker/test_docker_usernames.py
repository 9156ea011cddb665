"""``{username}`` in Docker kernels, on the real daemon: a named volume per user that only
that user's kernels mount, hostile user names mapped to safe volume names (or refused by
name), and the user on the container's record."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from provisioners.docker.daemon import LABEL_USERNAME
from provisioners.exceptions import ProvisionerConfigError
from provisioners.persist import adopt_kernels
from provisioners.targets import provisioner_for
from provisioners.usernames import UsernameError, path_segment
from tests.helpers import execute

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

HOSTILE = {
    "traversal": "../../etc",
    "dotdot": "..",
    "slash": "a/b",
    "dns-invalid": "Alice_B",
    "unicode": "jürgen",
    "emoji": "🐍",
    "rtl": "\u202eevil",
    "control": "a\x1bb\nc",
    "long": "x" * 300,
    "shell": "$(touch /tmp/pwned)",
}


@pytest.fixture
def run_volumes(docker_client: docker.DockerClient) -> Iterator[str]:
    """A prefix for this test's volume names; its volumes are removed after it."""
    prefix = f"cpt-{uuid.uuid4().hex[:8]}"
    yield prefix
    for volume in docker_client.volumes.list(filters={"name": prefix}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            volume.remove(force=True)


def mounted_volume(client: docker.DockerClient, km, target: str) -> str:
    """The name of the volume mounted at ``target`` in ``km``'s container."""
    engine = km.provisioner.engine
    attrs = client.api.inspect_container(engine.container_id)
    return next(m["Name"] for m in attrs["Mounts"] if m["Destination"] == target)


async def test_a_users_volume_follows_her_kernels_and_no_one_elses(
    docker_kernels, docker_client: docker.DockerClient, run_volumes: str
) -> None:
    make, _ = docker_kernels
    config = {
        "volumes": [f"{run_volumes}-{{username}}:/home/jovyan/work"],
        "working_dir": "/home/jovyan/work",
        "env": {"WHO": "{username}"},
    }
    first = make(config)
    await first.start_kernel(env={"KERNEL_USERNAME": "alice"})
    code = (
        "import os; open('notes.txt', 'w').write('alice-private'); "
        "print(os.getcwd(), os.environ['WHO'], os.environ['KERNEL_USERNAME'])"
    )
    result = await execute(first, code)
    assert result["status"] == "ok", result
    assert result["stdout"].split() == ["/home/jovyan/work", "alice", "alice"]
    assert mounted_volume(docker_client, first, "/home/jovyan/work") == f"{run_volumes}-alice"
    container = docker_client.api.inspect_container(first.provisioner.engine.container_id)
    assert container["Config"]["Labels"][LABEL_USERNAME] == "alice"
    rows = await first.provisioner.engine.list_kernels()
    assert [r["username"] for r in rows if r["kernel_id"] == first.kernel_id] == ["alice"]
    await first.shutdown_kernel()

    # the kernel and its container went, alice's volume stays: her next kernel reads it
    second, other = make(config), make(config)
    await asyncio.gather(
        second.start_kernel(env={"KERNEL_USERNAME": "alice"}),
        other.start_kernel(env={"KERNEL_USERNAME": "bob"}),
    )
    read = "import os; print(open('notes.txt').read() if os.path.exists('notes.txt') else 'none')"
    assert (await execute(second, read))["stdout"].strip() == "alice-private"
    assert (await execute(other, read))["stdout"].strip() == "none"
    assert mounted_volume(docker_client, other, "/home/jovyan/work") == f"{run_volumes}-bob"
    await asyncio.gather(second.shutdown_kernel(), other.shutdown_kernel())


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
async def test_a_hostile_username_gets_a_safe_volume_of_its_own(
    docker_kernels, docker_client: docker.DockerClient, run_volumes: str, name: str
) -> None:
    make, _ = docker_kernels
    km = make({"volumes": [f"{run_volumes}-{{username}}:/data"], "working_dir": "/data"})
    await km.start_kernel(env={"KERNEL_USERNAME": name})
    result = await execute(km, "import os; print(os.getcwd())")
    assert result["status"] == "ok" and result["stdout"].strip() == "/data", result
    volume = mounted_volume(docker_client, km, "/data")
    assert volume == f"{run_volumes}-{path_segment(name)}"
    assert "/" not in volume and ".." not in volume.split("-")
    labels = docker_client.api.inspect_container(km.provisioner.engine.container_id)["Config"][
        "Labels"
    ]
    assert labels[LABEL_USERNAME] == name  # the exact name on the record
    await km.shutdown_kernel()


async def test_a_username_with_nul_is_refused_by_name_before_any_container(
    docker_kernels,
) -> None:
    make, tracker = docker_kernels
    km = make({"working_dir": "/tmp"})
    with pytest.raises(UsernameError, match="KERNEL_USERNAME contains a NUL"):
        await km.start_kernel(env={"KERNEL_USERNAME": "a\x00b"})
    assert not tracker.containers(km.kernel_id)


async def test_a_start_without_a_username_is_refused_naming_the_setting(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make({"mounts": [{"Type": "volume", "Source": "cpt-{username}", "Target": "/data"}]})
    refused = re.escape("setting 'mounts' uses {username}")
    with pytest.raises(ProvisionerConfigError, match=refused):
        await km.start_kernel()
    assert not tracker.containers(km.kernel_id)  # nothing left behind
    # a kernelspec without {username} needs no user
    plain = make({"working_dir": "/tmp"})
    await plain.start_kernel()
    assert (await execute(plain, "import os; print(os.getcwd())"))["stdout"].strip() == "/tmp"
    await plain.shutdown_kernel()


async def test_an_adopted_kernel_keeps_its_user_and_her_volume_across_a_restart(
    docker_kernels,
    docker_client: docker.DockerClient,
    run_volumes: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, tracker = docker_kernels
    config = {
        "persist_kernels": True,
        "adoption_grace": 600,
        "volumes": [f"{run_volumes}-{{username}}:/home/jovyan/work"],
        "working_dir": "/home/jovyan/work",
    }
    km = make(config)
    await km.start_kernel(env={"KERNEL_USERNAME": "Alice_B"})
    write = "open('notes.txt', 'w').write('kept'); print('ok')"
    assert (await execute(km, write))["stdout"] == "ok\n"
    assert await km.provisioner.detach()  # the server stops; the kernel lives on

    kernel_dir = Path(km.kernel_spec.resource_dir).parent
    spec = KernelSpecManager(kernel_dirs=[str(kernel_dir)]).get_kernel_spec(km.kernel_name)
    (record,) = await provisioner_for(spec).adoptable_kernels()
    assert record["kernel_id"] == km.kernel_id and record["username"] == "Alice_B"

    # a fresh server adopts it: the provisioner knows its user again, and a restart (a
    # new container, no start request) mounts the same user's volume
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir.parent))
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    assert await adopt_kernels(mkm) == [km.kernel_id]
    adopted = mkm.get_kernel(km.kernel_id)
    assert adopted.provisioner.username == "Alice_B"
    await mkm.restart_kernel(km.kernel_id)
    read = "print(open('notes.txt').read())"
    assert (await execute(dict(adopted.get_connection_info()), read))["stdout"] == "kept\n"
    volume = mounted_volume(docker_client, adopted, "/home/jovyan/work")
    assert volume == f"{run_volumes}-Alice_B"
    await mkm.shutdown_kernel(km.kernel_id, now=True)
    assert tracker.containers(km.kernel_id) == []

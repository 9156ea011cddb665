"""Engine fixtures shared by the cross-target suites (security, faults): ``target`` runs a
test once per engine."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from provisioners.docker import connect_docker
from provisioners.exceptions import EngineUnavailableError
from tests.helpers import KERNEL_TEST_IMAGE, skip_or_fail
from tests.targets import TargetCase, docker_case, kubernetes_case, local_case, ssh_case

TARGET_NAMES = ["local", "docker", "ssh", "kubernetes"]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the local daemon; skips (fails under CI) without daemon or test image."""
    try:
        client = connect_docker(timeout=30, connect_timeout=3)
        client.ping()
    except EngineUnavailableError as exc:
        skip_or_fail("docker", f"no Docker daemon answers ({exc}); run .ci/lib/docker.sh")
    try:
        client.images.get(KERNEL_TEST_IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        skip_or_fail(
            "docker", f"image {KERNEL_TEST_IMAGE} is missing; run images/build-test-image.sh"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def ssh_engine(tmp_path_factory: pytest.TempPathFactory):
    """A loopback sshd and the "remote" runtime dir, or a skip (a failure under CI)."""
    from tests.ssh.conftest import start_sshd

    server = start_sshd(tmp_path_factory.mktemp("cross-target-sshd"))
    remote_runtime = tmp_path_factory.mktemp("remote-runtime")
    yield server, remote_runtime
    server.stop()


@pytest.fixture(params=TARGET_NAMES)
def target(request: pytest.FixtureRequest) -> TargetCase:
    if request.param == "local":
        return local_case()
    if request.param == "docker":
        return docker_case(request.getfixturevalue("docker_client"))
    if request.param == "ssh":
        return ssh_case(*request.getfixturevalue("ssh_engine"))
    if request.param == "kubernetes":
        return kubernetes_case(request.getfixturevalue("kube"))
    raise AssertionError(request.param)

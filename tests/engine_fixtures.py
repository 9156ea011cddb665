"""Engine fixtures shared by every suite (a plugin of tests/conftest.py): ``target`` runs a
test once per engine; ``docker_client``, ``ssh_engine``, ``kube`` (the Kubernetes API
double, or the cluster of ``$KUBECONFIG``) and ``password_user`` (a system user for
password authentication)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import docker
import pytest

from provisioners.docker import connect_docker
from provisioners.exceptions import EngineUnavailableError
from tests.helpers import KERNEL_TEST_IMAGE, Kube, skip_or_fail, start_sshd
from tests.targets import TargetCase, docker_case, kubernetes_case, local_case, ssh_case

try:  # the double's own fixture, written alongside (tests/kubernetes/apidouble/)
    from tests.kubernetes.apidouble.fixtures import k8s_double, kube_double  # noqa: F401

    _DOUBLE_ERROR = ""
except Exception as exc:  # a missing or broken double is reported by the fixture
    _DOUBLE_ERROR = f"{type(exc).__name__}: {exc}"

TARGET_NAMES = ["local", "docker", "ssh", "kubernetes"]
#: The test namespace on a real cluster ($KUBECONFIG); ``default`` when unset.
NAMESPACE_ENV = "CLUSTER_PROVISIONERS_TEST_NAMESPACE"
#: The system user of ``password_user``.
PASSWORD_USER = "cp-ssh-pw-test"


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
    server = start_sshd(tmp_path_factory.mktemp("cross-target-sshd"))
    remote_runtime = tmp_path_factory.mktemp("remote-runtime")
    yield server, remote_runtime
    server.stop()


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """The double's kubeconfig by default, or the real cluster's when $KUBECONFIG is set."""
    from tests.helpers.kube import reachable

    if os.environ.get("KUBECONFIG"):
        target = Kube(os.environ["KUBECONFIG"], os.environ.get(NAMESPACE_ENV, "default"))
    else:
        if _DOUBLE_ERROR:
            skip_or_fail("k8s", f"the Kubernetes API double cannot be loaded ({_DOUBLE_ERROR})")
        double = request.getfixturevalue("kube_double")
        target = Kube(double.kubeconfig, double.namespace, forbid=double.forbid)
    problem = asyncio.run(reachable(target.kubeconfig, target.namespace))
    if problem:
        skip_or_fail("k8s", f"the Kubernetes API cannot be used: {problem}")
    yield target


@pytest.fixture
def password_user() -> Iterator[tuple[str, str]]:
    """A system user with a random password, removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("chpasswd"):
        skip_or_fail("ssh", "creating a password user needs root, useradd and chpasswd")
    user, password = PASSWORD_USER, secrets.token_urlsafe(18)
    subprocess.run(["userdel", user], capture_output=True, check=False)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", user], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{user}:{password}", text=True, check=True)
        yield user, password
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)


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

"""Pytest fixtures for the Kubernetes API double.

``k8s_double`` (session; alias ``kube_double``) yields a running :class:`K8sDouble`;
``k8s_core_api``
(function) yields a kubernetes_asyncio ``CoreV1Api`` configured from its kubeconfig on
the test's own event loop. Import both into a conftest.py to use them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from provisioners.k8s.loop import EngineLoop
from tests.helpers import KERNEL_TEST_IMAGE, skip_or_fail
from tests.kubernetes.apidouble.double import K8sDouble

__all__ = ["docker_problem", "k8s_core_api", "k8s_double", "kube_double", "shared_double"]

_shared: dict[str, object] = {"double": None, "users": 0}
_shared_lock = threading.Lock()


def docker_problem(image: str) -> str | None:
    """Why the double cannot run here (no docker engine, or ``image`` missing), or None."""
    try:
        import docker
        import docker.errors
    except ImportError as exc:  # pragma: no cover - docker is a dependency
        return f"the docker SDK is not importable: {exc}"
    try:
        client = docker.from_env(timeout=10)
    except docker.errors.DockerException as exc:
        return f"no docker engine ({exc}); start one with: bash .ci/lib/docker.sh"
    try:
        client.ping()
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return f"image {image} is missing; build it with: bash images/build-test-image.sh"
    except docker.errors.DockerException as exc:
        return f"docker engine not answering: {exc}"
    finally:
        client.close()
    return None


@contextlib.contextmanager
def shared_double() -> Iterator[K8sDouble]:
    """One double per process, however many conftests import the fixture: the first
    user starts it, the last one stops it."""
    with _shared_lock:
        if _shared["double"] is None:
            _shared["double"] = K8sDouble(helper_image=KERNEL_TEST_IMAGE).start()
        _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
        double = _shared["double"]
    assert isinstance(double, K8sDouble)
    try:
        yield double
    finally:
        with _shared_lock:
            _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
            if _shared["users"] == 0:
                _shared["double"] = None
                # The Kubernetes engine loop lives until interpreter exit; stopped first,
                # its pod watches do not see the API go away (and log their retries).
                EngineLoop.shutdown()
                double.stop()


def _running_double() -> Iterator[K8sDouble]:
    problem = docker_problem(KERNEL_TEST_IMAGE)
    if problem:
        skip_or_fail("docker", problem)
    with shared_double() as double:
        yield double
        double.allow_all()


@pytest.fixture(scope="session")
def k8s_double() -> Iterator[K8sDouble]:
    """A running Kubernetes API double (skips, or fails under CI, without docker or the
    kernel test image). Attributes: ``kubeconfig_path`` (``kubeconfig`` as str),
    ``namespace``, ``server_url``, ``token``, ``user``, ``node_name``; controls:
    ``forbid``, ``allow_all``, ``leftovers``, ``compact``, ``set_node``, ``requests``.
    Deny rules persist until lifted: lift them in the test."""
    yield from _running_double()


@pytest.fixture(scope="session")
def kube_double() -> Iterator[K8sDouble]:
    """The same double as ``k8s_double``, under the name tests/kubernetes uses."""
    yield from _running_double()


@pytest.fixture
async def k8s_core_api(k8s_double: K8sDouble) -> AsyncIterator[object]:
    """A kubernetes_asyncio CoreV1Api for the double, on the test's event loop."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(k8s_double.kubeconfig_path), client_configuration=configuration
    )
    async with client.ApiClient(configuration) as api:
        yield client.CoreV1Api(api)

"""A multi-user site: a real JupyterHub whose users' servers run in gateway mode against
our server, a Jupyter Server with the ``provisioners.access`` extension resolving each
request's user through the Hub (:func:`tests.helpers.hub.hub_site`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import docker
import pytest

from provisioners.k8s.client import KubeClient
from tests.helpers import Kube
from tests.helpers.hub import Site, hub_site


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[Site]:
    """One site for the module's tests (each deletes the kernels it started)."""
    with hub_site(tmp_path_factory.mktemp("multiuser")) as running:
        yield running


@pytest.fixture
async def kube_client(kube: Kube) -> AsyncIterator[KubeClient]:
    """A client of the ``kube`` API (the double, or $KUBECONFIG's cluster)."""
    client = await KubeClient.connect(kube.kubeconfig)
    try:
        yield client
    finally:
        await client.close()

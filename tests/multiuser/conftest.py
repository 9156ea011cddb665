"""A multi-user site: a real JupyterHub whose users' servers run in gateway mode against
our server, a Jupyter Server with the ``provisioners.access`` extension resolving each
request's user through the Hub (:func:`tests.helpers.hub.hub_site`)."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.helpers.hub import Site, hub_site


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[Site]:
    """One site for the module's tests (each deletes the kernels it started)."""
    with hub_site(tmp_path_factory.mktemp("multiuser")) as running:
        yield running

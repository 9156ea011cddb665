"""Where the Kubernetes tests run: the in-repo API double, or a real cluster ($KUBECONFIG).

The ``kube`` fixture (tests/engine_fixtures.py) says which; no test knows which one it
has: both speak the real Kubernetes API. With ``KUBECONFIG`` set, the tests use its
current context, the namespace ``$CLUSTER_PROVISIONERS_TEST_NAMESPACE`` (default
``default``) and the image ``$CLUSTER_PROVISIONERS_TEST_IMAGE``, which the cluster's
nodes must have.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from provisioners.k8s.client import KubeClient
from provisioners.k8s.loop import EngineLoop
from tests.helpers import Kube
from tests.helpers.kube import no_leftovers


@pytest.fixture(autouse=True)
def _engine_loop_released() -> Iterator[None]:
    """After each test (and its managers' teardown), no provisioner it made still holds
    the Kubernetes engine loop: every start, failed or not, lets go of it."""
    before = EngineLoop.holders()
    yield
    leaked = EngineLoop.holders() - before
    assert not leaked, f"{len(leaked)} provisioner(s) still hold the Kubernetes engine loop"


@pytest.fixture
async def kube_api(kube: Kube) -> AsyncIterator[KubeClient]:
    """A client of the test API; after the test, checks that this process left no
    kernel pod, Secret or pending removal behind (waiting as long as the engine needs)."""
    client = await KubeClient.connect(kube.kubeconfig)
    try:
        yield client
        await no_leftovers(client, kube.namespace)
    finally:
        await client.close()

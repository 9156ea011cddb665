"""The cross-target fixtures (see tests/engine_fixtures.py)."""

from tests.engine_fixtures import docker_engine, ssh_engine, target  # noqa: F401 - fixtures
from tests.kubernetes.conftest import kube, kube_double  # noqa: F401 - fixtures

"""The cross-target fixtures: ``target`` comes from tests/engine_fixtures.py (a plugin
of tests/conftest.py); the Kubernetes ones from the Kubernetes suite."""

from tests.kubernetes.conftest import kube, kube_double  # noqa: F401 - fixtures

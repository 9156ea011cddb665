"""Fixtures of the Kubernetes API double's own tests."""

from tests.kubernetes.apidouble.fixtures import k8s_core_api, k8s_double

__all__ = ["k8s_core_api", "k8s_double"]

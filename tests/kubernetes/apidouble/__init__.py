"""An in-repo Kubernetes API double whose pods run as docker containers (see README.md)."""

from .double import DEFAULT_NAMESPACE, K8sDouble

__all__ = ["DEFAULT_NAMESPACE", "K8sDouble"]

"""Whether this server runs in a Kubernetes pod: two questions, two answers, one module.

- :func:`incluster_config_usable`: can the in-cluster configuration be loaded? Both the
  API's service environment and a service-account token are needed (what
  kubernetes' ``load_incluster_config`` reads). The Kubernetes target asks this to pick
  its configuration and its connection mode.
- :func:`maybe_in_pod`: might this process run in a pod? Either sign is enough. The
  local fallback asks this before it starts a kernel next to the server: a pod with the
  token but no service environment (or the reverse) still holds what a local kernel must
  not see, so the safer, wider rule refuses there too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "SERVICE_ACCOUNT_TOKEN",
    "incluster_config_usable",
    "maybe_in_pod",
]

#: Where Kubernetes mounts a pod's service account (token, namespace, CA).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_ACCOUNT_TOKEN = SERVICE_ACCOUNT_DIR / "token"


def _has_service_env() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def incluster_config_usable() -> bool:
    """True when the in-cluster configuration can be loaded: the API's service
    environment AND a service-account token are there."""
    return _has_service_env() and SERVICE_ACCOUNT_TOKEN.exists()


def maybe_in_pod() -> bool:
    """True when this process may run inside a Kubernetes pod: the API's service
    environment OR a service-account token is there (the local fallback's refusal)."""
    return _has_service_env() or SERVICE_ACCOUNT_TOKEN.exists()

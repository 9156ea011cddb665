"""One server, many users: identity, per-user kernels and sessions, groups and quotas.

Enable it as a Jupyter Server extension; it sets the identity provider and the
authorizer when they are left at Jupyter Server's defaults::

    c.ServerApp.jpserver_extensions = {"provisioners.access": True}
    c.KernelAccess.token_file = "/etc/gateway/users.json"   # without a Hub
    c.KernelAccess.hub_api_url = "http://hub:8081/hub/api"  # with JupyterHub
    c.KernelAccess.max_kernels_per_user = 3

The server's own token stays an admin credential. A user other than an admin sees and
uses only the kernels and sessions they started (anyone else's answer 404), only the
kernelspecs their groups allow (``metadata.allowed_groups``), and no contents, terminals
or server shutdown.
"""

from __future__ import annotations

from typing import Any

from .authorizer import AccessAuthorizer
from .identity import AccessIdentityProvider
from .policy import AccessError, AccessUser, KernelAccess

__all__ = [
    "AccessAuthorizer",
    "AccessError",
    "AccessIdentityProvider",
    "AccessUser",
    "KernelAccess",
]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server import AccessExtension

    return [{"module": "provisioners.access", "app": AccessExtension}]

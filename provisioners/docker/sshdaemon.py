"""A Docker daemon at ``ssh://`` reached with our SSH settings, not docker-py's defaults.

docker-py's own SSH transport reads ``~/.ssh/config`` and ``~/.ssh/known_hosts`` and the
default keys, whatever the kernelspec says. Here the SSH connection is ours
(:func:`provisioners.connection.sshconnect.connect_client`): the provisioner's
``ssh_known_hosts``, key, password reference, host-key policy and connect timeout. Over
it, each HTTP connection to the daemon is ``docker system dial-stdio`` on the remote
host, as docker-py does.
"""

from __future__ import annotations

from typing import Any

import docker
from docker.transport import SSHHTTPAdapter

from ..connection.sshconnect import SSHSettings, connect_client

#: The mount point docker-py routes ssh:// requests through.
_SSH_PREFIX = "http+docker://ssh"
#: HTTP connections (SSH sessions) to the daemon at once; sshd's MaxSessions is 10.
MAX_SESSIONS = 4
#: Any version docker-py accepts without asking the daemon; replaced by the daemon's.
_PROVISIONAL_VERSION = "1.41"


class _OurSSHAdapter(SSHHTTPAdapter):  # type: ignore[misc]
    """docker-py's SSH adapter, its paramiko client made by our SSH layer."""

    def __init__(self, base_url: str, settings: SSHSettings, **kwargs: Any) -> None:
        self._settings = settings
        super().__init__(base_url, shell_out=False, **kwargs)

    def _create_paramiko_client(self, base_url: str) -> None:
        self.ssh_client = None
        self.ssh_params: dict[str, Any] = {}

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        # Each HTTP connection is an SSH session ('docker system dial-stdio') and sshd
        # allows 10 per connection (MaxSessions). docker-py keeps a pool per URL (each
        # holding a session): use one pool for every URL, and wait for a free connection
        # instead of opening more.
        pool = super().get_connection(_SSH_PREFIX, proxies)
        pool.block = True
        return pool

    def _connect(self) -> None:
        if self.ssh_client is not None:
            self.ssh_client.close()
        self.ssh_client = connect_client(self._settings)


def docker_over_ssh(
    docker_host: str, settings: SSHSettings, *, timeout: float, max_pool_size: int = MAX_SESSIONS
) -> docker.DockerClient:
    """A client of the daemon at ``docker_host`` (``ssh://…``) through ``settings``.

    Raises our SSH errors (unreachable host, unknown or changed host key, refused
    credentials) and docker-py's when the daemon does not answer.
    """
    # shell-out mode builds no SSH connection of docker-py's own: the adapter is replaced
    client = docker.DockerClient(
        base_url=docker_host,
        version=_PROVISIONAL_VERSION,
        timeout=timeout,
        use_ssh_client=True,
        max_pool_size=max_pool_size,
    )
    try:
        adapter = _OurSSHAdapter(
            docker_host, settings, timeout=timeout, max_pool_size=max_pool_size
        )
        api = client.api
        old, api._custom_adapter = api._custom_adapter, adapter
        old.close()
        api.mount(_SSH_PREFIX, adapter)
        api._version = api._retrieve_server_version()
    except BaseException:
        client.close()
        raise
    return client

"""jupyter_client's connection API, with what remote kernels need added.

``write_connection_file``, ``find_connection_file``, ``ConnectionFileMixin``,
``launch_kernel`` and ``KernelConnectionInfo`` are jupyter_client's own: they already
do the job. Ours are :class:`LocalPortCache` (same interface, but backed by the
cluster-aware, cross-process port cache) and :func:`connection_file_content` (the bytes
of a connection file, to copy into a container, a Secret or an SFTP upload). The SSH
functions live in :mod:`provisioners.connection.tunnels`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from jupyter_client.connect import (
    ConnectionFileMixin,
    KernelConnectionInfo,
    find_connection_file,
    write_connection_file,
)
from jupyter_client.launcher import launch_kernel

from .curve import CURVE_KEYS
from .ports import DEFAULT_PORT_RANGE, LOCAL_HOST, ClusterPortCache

__all__ = [
    "PORT_NAMES",
    "ConnectionFileMixin",
    "KernelConnectionInfo",
    "LocalPortCache",
    "connection_file_content",
    "find_connection_file",
    "launch_kernel",
    "write_connection_file",
]

#: The five channels' port fields of a connection file, in jupyter_client's order.
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")

_CONNECTION_KEYS = (
    *PORT_NAMES,
    "ip",
    "key",
    "transport",
    "signature_scheme",
    "kernel_name",
)


def connection_file_content(info: dict[str, Any], **overrides: Any) -> bytes:
    """The JSON of a connection file for ``info`` (key as text), as jupyter_client writes it.

    ``overrides`` replace fields, e.g. ``ip='0.0.0.0'`` for a kernel bound in a container.
    """
    data = {k: info[k] for k in _CONNECTION_KEYS if k in info}
    data.update(
        {k: v for k, v in info.items() if k not in data and k.startswith(("jupyter_", "curve"))}
    )
    data.update(overrides)
    for name, value in list(data.items()):
        if isinstance(value, bytes):
            data[name] = value.decode()
    return json.dumps(data, indent=2).encode()


class LocalPortCache:
    """jupyter_client's ``LocalPortCache`` interface over the cluster-aware cache.

    Unlike jupyter_client's in-process set, a port found here is held across threads
    *and* processes of this machine until :meth:`return_port`, or until this process
    dies.
    """

    _instance: LocalPortCache | None = None
    _lock = threading.Lock()

    def __init__(self, port_range: str = DEFAULT_PORT_RANGE) -> None:
        self.port_range = port_range
        self._owner = f"local-port-cache-{id(self)}"

    @classmethod
    def instance(cls) -> LocalPortCache:
        """The process-wide instance (jupyter_client's singleton interface)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def find_available_port(self, ip: str) -> int:
        """A port free on this machine and held for the caller until returned."""
        (port,) = ClusterPortCache.instance().allocate(
            1, self._owner, host=LOCAL_HOST, port_range=self.port_range
        )
        return port

    def return_port(self, port: int) -> None:
        """Give ``port`` back to the pool."""
        ClusterPortCache.instance().release(self._owner, [port])


#: Connection fields held as bytes in memory and as text in JSON.
_BYTES_FIELDS = ("key", *CURVE_KEYS)


def json_safe(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with its key and Curve keys as text (raises if not JSON-serializable)."""
    out = dict(info)
    for name in _BYTES_FIELDS:
        if isinstance(out.get(name), bytes):
            out[name] = out[name].decode()
    json.dumps(out)
    return out


def with_bytes(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with its key and Curve keys as bytes, as a kernel manager holds them."""
    out = dict(info)
    for name in _BYTES_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = out[name].encode()
    return out

"""``provisioners.connect`` mirrors ``jupyter_client.connect``: code moves over by changing
only its imports. The implementation lives in :mod:`provisioners.connection`."""

from __future__ import annotations

from .connection.files import (
    ConnectionFileMixin,
    KernelConnectionInfo,
    LocalPortCache,
    connection_file_content,
    find_connection_file,
    launch_kernel,
    write_connection_file,
)

__all__ = [
    "ConnectionFileMixin",
    "KernelConnectionInfo",
    "LocalPortCache",
    "connection_file_content",
    "find_connection_file",
    "launch_kernel",
    "write_connection_file",
]

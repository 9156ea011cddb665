"""Is a kernel reachable through an SSH server? Its heartbeat probed as the tunnels reach it.

A start through SSH ends once the kernel's heartbeat answers over a ``direct-tcpip``
channel of the SSH link (the way :mod:`provisioners.connection.tunnels` relays every
channel), and fails by name when the server refuses to forward TCP connections.
"""

from __future__ import annotations

import paramiko
from paramiko.common import OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

from ..exceptions import ForwardingRefusedError, TunnelError
from .sshlink import SSHLink

#: A ZMTP peer's greeting starts with this byte.
_ZMTP_SIGNATURE = b"\xff"


def forwarded_zmq_listens(link: SSHLink, host: str, port: int, timeout: float) -> bool:
    """True when a ZMQ socket answers on ``host:port`` as the SSH server sees it.

    Opens a ``direct-tcpip`` channel, as the kernel's tunnels do, and reads the first
    byte of the peer's greeting. Blocking: call it in a thread. Raises
    :class:`ForwardingRefusedError` when the server refuses to forward at all.
    """
    try:
        chan = link.open_channel(host, port)
    except TunnelError as exc:
        cause = exc.__cause__
        if (
            isinstance(cause, paramiko.ChannelException)
            and cause.code == OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        ):
            msg = (
                f"the SSH server {link.settings.address} refuses to forward TCP connections "
                f"({cause.text}; is 'AllowTcpForwarding no' set in its sshd_config?): the "
                "kernel's channels cannot be reached through it"
            )
            raise ForwardingRefusedError(msg) from exc
        return False  # nothing listens there yet
    try:
        chan.settimeout(timeout)
        first = chan.recv(1)
    except (OSError, EOFError, paramiko.SSHException):
        return False
    finally:
        chan.close()
    return first == _ZMTP_SIGNATURE

"""CurveZMQ transport encryption: the policy, the keypair, and a check on the wire.

jupyter_client 8.10 has ``KernelManager.transport_encryption`` (``disabled``, ``auto``,
``required``) and kernelspec ``metadata.supported_encryption: ["curve"]``: the manager's
keypair (``curve_publickey``/``curve_secretkey``) goes into the kernel's connection file,
ipykernel >= 7.4 makes every socket a Curve server with it, and the manager's clients
use it. A kernel that ignores the keys (ipykernel < 7.4) keeps talking plain ZMTP, which
a Curve client cannot reach: :func:`probe_curve` tells the two apart on the heartbeat
channel, so a start can fail with a named error instead of leaving a kernel nobody can
talk to, or one that talks in plain text.
"""

from __future__ import annotations

import time
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

__all__ = [
    "CURVE_KEYS",
    "POLICIES",
    "confirm_curve",
    "curve_available",
    "new_keypair",
    "probe_curve",
    "select_keys",
    "spec_supports_curve",
    "stricter_policy",
]

#: Encryption policies from the weakest to the strictest.
POLICIES = ("disabled", "auto", "required")
#: Connection-file fields that hold the keypair (Z85 text in the file).
CURVE_KEYS = ("curve_publickey", "curve_secretkey")
#: Transports CurveZMQ works over (inproc has no handshake).
CURVE_TRANSPORTS = ("tcp", "ipc")

#: A peer that answers without Curve fails the handshake with a ZMTP protocol error
#: (mechanism mismatch). A connection closed during the handshake (a tunnel or
#: port-forward whose kernel is not listening yet) is "no detail": the client retries.
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def curve_available() -> bool:
    """True when this process's libzmq has CurveZMQ (built with libsodium)."""
    return bool(zmq.has("curve"))


def new_keypair() -> tuple[bytes, bytes]:
    """A new CurveZMQ keypair (public, secret), Z85-encoded."""
    public, secret = zmq.curve_keypair()
    return public, secret


def stricter_policy(*policies: str) -> str:
    """The strictest of ``policies`` (empty values are ignored)."""
    ranks = [POLICIES.index(p.lower()) for p in policies if p]
    return POLICIES[max(ranks, default=0)]


def spec_supports_curve(kernel_spec: Any) -> bool:
    """Whether the kernelspec's ``metadata.supported_encryption`` lists ``curve``."""
    metadata = getattr(kernel_spec, "metadata", None) or {}
    declared = metadata.get("supported_encryption")
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list | tuple | set):
        return False
    return "curve" in {str(item).strip().lower() for item in declared}


async def probe_curve(url: str, server_key: bytes, timeout: float) -> bool | None:
    """Handshake with the Curve server at ``url`` (the kernel's heartbeat channel).

    True once a Curve handshake succeeds, False when the peer answers without Curve
    (a kernel that ignored the keys), None when nothing answered within ``timeout``.
    Nothing is sent: only the ZMTP greeting and handshake cross the wire.
    """
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    client_public, client_secret = zmq.curve_keypair()
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret
    sock.curve_serverkey = server_key
    monitor = sock.get_monitor_socket()
    deadline = time.monotonic() + timeout
    try:
        sock.connect(url)
        while (left := deadline - time.monotonic()) > 0:
            if not await monitor.poll(left * 1000):
                break
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event["event"] in _FAILED:
                return False
        return None
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def select_keys(
    manager: Any, kernel_spec: Any, provisioner_policy: str = ""
) -> tuple[bytes, bytes] | None:
    """The keypair a kernel of ``manager`` gets, or None for plain ZMTP.

    The policy is the stricter of the manager's ``transport_encryption`` and
    ``provisioner_policy``. A keypair the manager already holds is reused (across
    restarts, as jupyter_client does); a new one is set on the manager, so that its
    clients use it. Raises :class:`TransportEncryptionError` where the policy is
    ``required`` and encryption cannot be applied.
    """
    from ..exceptions import TransportEncryptionError

    policy = stricter_policy(
        str(getattr(manager, "transport_encryption", "") or ""), provisioner_policy
    )
    public = getattr(manager, "curve_publickey", None)
    secret = getattr(manager, "curve_secretkey", None)
    if public is not None and secret is not None:
        held: tuple[bytes, bytes] | None = (public, secret)
    else:
        held = None
    if policy == "disabled" and held is None:
        return None
    transport = getattr(manager, "transport", "tcp")
    problem = ""
    if held is None and not spec_supports_curve(kernel_spec):
        problem = "the kernelspec does not list 'curve' in metadata.supported_encryption"
    elif transport not in CURVE_TRANSPORTS:
        problem = f"transport {transport!r} cannot carry CurveZMQ"
    elif not curve_available():
        problem = "this server's pyzmq has no CurveZMQ (zmq.has('curve') is False)"
    if problem:
        if policy == "required":
            raise TransportEncryptionError(f"transport encryption is required but {problem}")
        return None
    if held is None:
        held = new_keypair()
        if manager is not None and hasattr(manager, "curve_publickey"):
            manager.curve_publickey, manager.curve_secretkey = held
    return held


async def confirm_curve(info: Any, server_key: bytes, timeout: float) -> str:
    """Empty when the kernel at ``info`` speaks Curve, else what went wrong."""
    if info.get("transport") == "ipc":
        url = f"ipc://{info['ip']}-{info['hb_port']}"
    else:
        url = f"tcp://{info['ip']}:{info['hb_port']}"
    answer = await probe_curve(url, server_key, timeout)
    if answer:
        return ""
    if answer is None:
        return f"did not answer a CurveZMQ handshake within launch_timeout={timeout:g} s"
    return (
        "answered in plain text although its connection file held CurveZMQ keys: the "
        "kernel does not support transport encryption (ipykernel >= 7.4 does)"
    )

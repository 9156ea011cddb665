"""Named errors raised by cluster-provisioners, all under one base class.

Every error is also a tornado ``HTTPError`` (tornado comes with jupyter_client), so
Jupyter Server answers a failed ``POST /api/kernels`` with the error's own words and an
HTTP status, instead of ``500 "Unhandled error"``. ``str(error)`` stays the plain message.
"""

from __future__ import annotations

from typing import ClassVar

from tornado.web import HTTPError


class ProvisionerError(RuntimeError, HTTPError):
    """Base class of every error this package raises on purpose.

    ``target`` names the engine (``local``, ``docker``, ``ssh``, ``kubernetes``) and
    ``kernel_id`` the kernel, where they are known. ``status_code`` is the HTTP status a
    Jupyter Server answers with when the error ends a request.
    """

    #: HTTP status of a request this error ends (see the module docstring).
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, target: str = "", kernel_id: str = "") -> None:
        RuntimeError.__init__(self, message)
        self.status_code = self.http_status
        self.reason: str | None = None
        self.target = target
        self.kernel_id = kernel_id

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def log_message(self) -> str:
        """The message, as Jupyter Server puts it in its JSON error reply."""
        return str(self)

    def get_message(self) -> str:
        """The message, as tornado logs it (never %-formatted)."""
        return str(self)


class ProvisionerConfigError(ProvisionerError, ValueError):
    """A provisioner config (kernel.json or Jupyter config) is invalid.

    Raised before anything starts; ``key`` names the offending setting and
    ``kernel_spec`` the kernelspec it came from.
    """

    def __init__(
        self, message: str, *, key: str = "", kernel_spec: str = "", target: str = ""
    ) -> None:
        super().__init__(message, target=target)
        self.key = key
        self.kernel_spec = kernel_spec


class EngineUnavailableError(ProvisionerError):
    """The engine (Docker daemon, SSH host, Kubernetes API) cannot be reached.

    This is the only error that allows the local fallback.
    """

    http_status = 503


class KernelStartError(ProvisionerError):
    """The engine was reached but the kernel could not be started (bad image, crash...)."""


class TransportEncryptionError(ProvisionerError):
    """CurveZMQ encryption was asked for but cannot be applied.

    The kernelspec does not declare ``curve``, this pyzmq lacks CurveZMQ, the transport
    cannot carry it, or the kernel answered in plain text. A start never falls back to
    plain text silently: it fails with this error.
    """


class PortsExhaustedError(ProvisionerError):
    """No free ports are left in the configured range for a host."""

    http_status = 503


class TunnelError(ProvisionerError):
    """An SSH tunnel or port-forward could not be opened."""


class HostKeyError(TunnelError):
    """An SSH host key is unknown or does not match known_hosts."""


class SSHAuthenticationError(TunnelError):
    """The SSH server was reached but refused the credentials (key, agent or password)."""


class SSHUnreachableError(TunnelError, EngineUnavailableError):
    """The SSH server cannot be reached (refused, timed out, unknown name).

    Also an :class:`EngineUnavailableError`, so an SSH target may fall back to a local
    kernel; host-key and authentication errors never do.
    """


class ForwardingRefusedError(TunnelError, KernelStartError):
    """The SSH server refuses to forward TCP connections (``AllowTcpForwarding no``),
    so the kernel's channels cannot be reached through it."""

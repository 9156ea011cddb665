"""Named errors raised by cluster-provisioners, all under one base class."""

from __future__ import annotations


class ProvisionerError(RuntimeError):
    """Base class of every error this package raises on purpose.

    ``target`` names the engine (``local``, ``docker``, ``ssh``, ``kubernetes``) and
    ``kernel_id`` the kernel, where they are known.
    """

    def __init__(self, message: str, *, target: str = "", kernel_id: str = "") -> None:
        super().__init__(message)
        self.target = target
        self.kernel_id = kernel_id


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


class KernelStartError(ProvisionerError):
    """The engine was reached but the kernel could not be started (bad image, crash...)."""


class PortsExhaustedError(ProvisionerError):
    """No free ports are left in the configured range for a host."""


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

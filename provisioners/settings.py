"""The settings every cluster provisioner shares, checked against the kernelspec's config.

Every setting is a traitlets trait with help text, set per kernel in the kernelspec's
``metadata.kernel_provisioner.config`` or in a Jupyter config file. An unknown key or a
wrong value is a :class:`ProvisionerConfigError` naming the key and the kernelspec.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, ClassVar

from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, TraitError, Unicode
from traitlets.config import LoggingConfigurable

from .connection.ports import DEFAULT_PORT_RANGE, PortRange
from .exceptions import ProvisionerConfigError
from .secrets import check_reference, kube_secret_ref, resolve_reference

if TYPE_CHECKING:
    from .connection.sshconnect import SSHSettings
    from .parameters import LaunchParameters

#: Kernel ids end up in file, container and pod names: a fixed, safe alphabet only.
_SAFE_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Keys the jupyter_client factory passes besides the kernelspec's config.
_FACTORY_KEYS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


class SharedSettings(LoggingConfigurable):
    """The settings of every target, and the checks of a kernelspec's config."""

    #: Short engine name used in logs, errors, labels and the CLI.
    target: ClassVar[str] = "base"
    #: Settings that hold a secret: references only (see :mod:`provisioners.secrets`).
    secret_settings: ClassVar[tuple[str, ...]] = ("ssh_password",)
    #: Whether 'secret:NAME/KEY' (a Kubernetes Secret) references can be resolved.
    kube_secret_refs: ClassVar[bool] = False
    #: Secrets resolved through the engine (a Kubernetes Secret), by setting name.
    resolved_secrets: dict[str, str]
    #: Launch parameters (cpu, memory, gpus, image) this target maps onto its settings.
    launch_resources: ClassVar[tuple[str, ...]] = ()
    #: This kernel's launch parameters, once its first start resolved them.
    launch_parameters: LaunchParameters | None = None

    port_range = Unicode(
        DEFAULT_PORT_RANGE,
        config=True,
        help="""Range 'LOW-HIGH' from which the kernel's five ports are allocated, per host,
        through the cluster-aware port cache. The default lies below Linux's ephemeral range.""",
    )
    fallback = CaselessStrEnum(
        ["local", "none"],
        default_value="local",
        config=True,
        help="""What to do when the engine (Docker daemon, SSH host, Kubernetes API) cannot
        be reached: 'local' starts the kernel as a local process and logs a warning naming
        the engine and the cause; 'none' raises. Other start failures never fall back.
        The fallback kernel gets this target's environment policy, not the server's.""",
    )
    fallback_in_pod = Bool(
        False,
        config=True,
        help="""Allow the local fallback when this server runs inside a Kubernetes pod.
        Off: there a local kernel would run next to the pod's service-account token and
        the server's secrets, so the start is refused instead.""",
    )
    persist_kernels = Bool(
        False,
        config=True,
        help="""Let the kernel outlive its server. When the server stops (a SIGTERM from a
        rollout, an upgrade, an eviction, a person restarting it) the kernel is detached
        instead of shut down, and the next server of the same installation adopts it under
        the same kernel id, with its connection info and keys; after a server that died
        (SIGKILL, OOM) too. Needs the 'provisioners.persist' server extension
        (c.ServerApp.jpserver_extensions). Docker, SSH and Kubernetes kernels only: a local
        kernel is the server's child process and ends with it.""",
    )
    adoption_grace = Float(
        900.0,
        config=True,
        help="""Seconds a persisted kernel whose server stopped or died waits for a server to
        adopt it. After that the orphan sweep removes it, as it removes at once the kernels
        of a server that did not persist them.""",
    )
    launch_timeout = Float(
        60.0,
        config=True,
        help="Seconds the engine may take to start the kernel before the start fails.",
    )
    command = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Command run for the kernel instead of the kernelspec's argv. '{connection_file}'
        is replaced by the path of the connection file as the kernel sees it.""",
    )
    env = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra environment variables for the kernel, added after the kernelspec's env
        and the KERNEL_* values of the start request. On the Docker, SSH and Kubernetes
        targets '{username}' in a value stands for the kernel's user (KERNEL_USERNAME) as a
        safe path segment, e.g. {"USER_DATA": "/data/{username}"}.""",
    )
    inherit_server_env = Bool(
        False,
        config=True,
        help="""Pass the server's whole environment to the kernel. Off for remote targets: a
        remote kernel sees only the kernelspec's env, this provisioner's 'env' and the
        KERNEL_* values of the start request, never the server's tokens or credentials.""",
    )
    ssh_server = Unicode(
        "",
        config=True,
        help="""'[user@]host[:port]' of an SSH server to tunnel the kernel's ZMQ channels
        through (a bastion, or a remote Docker host). Empty: connect directly.""",
    )
    ssh_key = Unicode("", config=True, help="Private key file for 'ssh_server' (optional).")
    ssh_password = Unicode(
        "",
        config=True,
        help="""Password for 'ssh_server', when keys are not used: a reference, never the
        password itself: 'file:/path' (mode 0600), 'env:VARIABLE' or, for Kubernetes
        kernels, 'secret:NAME/KEY'.""",
    )
    ssh_known_hosts = Unicode(
        "",
        config=True,
        help="known_hosts file checked for 'ssh_server' (default: ~/.ssh/known_hosts).",
    )
    ssh_accept_unknown_host_keys = Bool(
        False,
        config=True,
        help="""Accept an SSH host key not listed in known_hosts (a changed key is always
        refused). Off by default: an unknown host is an error.""",
    )
    ssh_connect_timeout = Float(
        10.0, config=True, help="Seconds to wait for the SSH server to connect and authenticate."
    )
    transport_encryption = CaselessStrEnum(
        ["", "auto", "required"],
        default_value="",
        config=True,
        help="""CurveZMQ encryption of the kernel's channels, on top of the kernel
        manager's own transport_encryption (the stricter of the two applies). '' follows
        the manager; 'auto' encrypts when the kernelspec's metadata.supported_encryption
        lists 'curve'; 'required' encrypts or fails the start with TransportEncryptionError,
        never falling back to plain text. The keypair travels in the connection file only.""",
    )
    shutdown_wait_time = Float(
        None,
        allow_none=True,
        config=True,
        help="""Seconds jupyter_client waits for a graceful shutdown before terminating the
        kernel (half of it), then killing it. Unset: the kernel manager's own
        shutdown_wait_time (5 s by default). A value set here wins, lower or higher.""",
    )
    cleanup_retry_interval = Float(
        10.0,
        config=True,
        help="""Seconds between retries of a kernel's removal that the engine refused or could
        not serve (daemon gone, API 403/5xx, SSH drop). What is left stays recorded, with its
        ports, and is retried until removed (or swept once this server is gone).""",
    )
    pool_size = Int(
        0,
        min=0,
        config=True,
        help="""Warm kernels of this kernelspec kept started and ready by this server process:
        a start request claims one (its own HMAC key and Curve keys) and the pool refills in
        the background. 0: every start is cold. Idle warm kernels hold memory and, on
        Kubernetes, quota; KernelPools.max_total caps them across kernelspecs. A request
        with inputs a warm kernel was started without (KERNEL_* values, a working dir,
        extra arguments) starts cold.""",
    )
    pool_optional_env = List(
        Unicode(),
        default_value=["JPY_SESSION_NAME"],
        config=True,
        help="""Names of start-request environment variables a claimed warm kernel may go
        without (the claim is logged naming them). Any other request variable the kernel
        would see (KERNEL_*) makes the start cold. Empty: JPY_SESSION_NAME starts cold too.""",
    )
    kernel_ports = Int(5, help="How many ports a kernel needs (shell, iopub, stdin, hb, control).")

    def _configure(self, kwargs: dict[str, Any]) -> str:
        """Apply the kernelspec's config (``kwargs``); return the kernelspec's name.

        Raises :class:`ProvisionerConfigError` naming the key and the kernelspec.
        """
        kernel_spec = kwargs.get("kernel_spec")
        spec_name = kernelspec_name(kernel_spec, kwargs.get("parent"))
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FACTORY_KEYS}
        allowed = set(self.class_trait_names(config=True))
        for key in settings:
            if key not in allowed:
                msg = (
                    f"kernelspec {spec_name!r}: unknown {self.target} provisioner config key "
                    f"{key!r}; known keys: {', '.join(sorted(allowed))}"
                )
                raise ProvisionerConfigError(
                    msg, key=key, kernel_spec=spec_name, target=self.target
                )
        try:
            super().__init__(**kwargs)
        except TraitError as exc:
            msg = f"kernelspec {spec_name!r}: invalid {self.target} provisioner config: {exc}"
            raise ProvisionerConfigError(msg, kernel_spec=spec_name, target=self.target) from exc
        for key, value in settings.items():
            try:
                if isinstance(self.traits()[key], List) and not isinstance(value, list | tuple):
                    problem = f"expected a list, not {type(value).__name__}"
                    raise TraitError(problem)
                setattr(self, key, value)
            except TraitError as exc:
                msg = (
                    f"kernelspec {spec_name!r}: config key {key!r} of the {self.target} "
                    f"provisioner has a wrong value {value!r}: {exc}"
                )
                raise ProvisionerConfigError(
                    msg, key=key, kernel_spec=spec_name, target=self.target
                ) from exc
        kernel_id = kwargs.get("kernel_id") or ""
        if not _SAFE_KERNEL_ID.fullmatch(str(kernel_id)):
            msg = (
                f"kernelspec {spec_name!r}: kernel id {str(kernel_id)[:80]!r} is not allowed: "
                "use 1-128 letters, digits, '.', '_' or '-' (a UUID, as jupyter_client makes)"
            )
            raise ProvisionerConfigError(
                msg, key="kernel_id", kernel_spec=spec_name, target=self.target
            )
        try:
            self.validate_config()
        except ProvisionerConfigError as exc:
            exc.kernel_spec = spec_name
            exc.args = (f"kernelspec {spec_name!r}: {exc.args[0]}",)
            raise
        return spec_name

    def apply_launch_parameters(self, env: dict[str, str] | None) -> None:
        """Resolve this kernel's launch parameters from its start request's ``env``
        (``KERNEL_<NAME>``, see :mod:`provisioners.parameters`) and apply them to this
        kernel's settings: the resources through :meth:`launch_settings`, the others
        exported as ``KERNEL_<NAME>`` in :attr:`env`.

        Raises :class:`~provisioners.parameters.LaunchParameterError` naming a bad
        value, and :class:`ProvisionerConfigError` for a bad schema or a resource
        parameter this target cannot honour. Nothing is started or allocated before.
        """
        from .parameters import LaunchBounds, resolve_parameters, unsupported_resources

        requested = requested_env_names(env)
        request_env = {k: v for k, v in (env or {}).items() if k in requested}
        bounds = LaunchBounds.instance(config=self.config)
        kernel_spec = getattr(self, "kernel_spec", None)
        params = resolve_parameters(kernel_spec, request_env, bounds=bounds)
        spec_name = kernelspec_name(kernel_spec, self.parent)
        refused = unsupported_resources(params, self.launch_resources, spec_name, self.target)
        if refused is not None:
            raise refused
        for key, value in self.launch_settings(params).items():
            setattr(self, key, value)
        if params.values:
            self.env = {**self.env, **params.other_env()}
            self.validate_config()
        self.launch_parameters = params

    def restore_launch_parameters(self, env: Any) -> None:
        """Apply again the launch parameters a running kernel was started with (``env``:
        their ``KERNEL_<NAME>`` values, saved in its provisioner info), so that a restart
        of the reattached kernel keeps them. Values the kernelspec or the bounds refuse
        now are logged, and the defaults apply. Never raises."""
        saved = {str(k): str(v) for k, v in (env or {}).items()} if isinstance(env, dict) else {}
        for attempt in (saved, {}):
            try:
                self.apply_launch_parameters(attempt)
                return
            except ProvisionerConfigError as exc:
                self.log.warning("Launch parameters of a reattached kernel not applied: %s", exc)

    def launch_settings(self, params: LaunchParameters) -> dict[str, Any]:
        """This target's settings for the resource parameters of ``params`` (those in
        :attr:`launch_resources`), set on this kernel's provisioner only. Pure."""
        return {}

    def validate_config(self) -> None:
        """Cross-field checks; raise :class:`ProvisionerConfigError` naming the key."""
        PortRange.parse(self.port_range)
        for key in self.secret_settings:
            value = getattr(self, key)
            check_reference(key, value, target=self.target)
            if kube_secret_ref(value) and not self.kube_secret_refs:
                problem = "a Kubernetes Secret reference needs the kubernetes target"
                raise self.config_error(key, f"{problem}; use 'file:' or 'env:'")

    def ssh_settings(self, server: str = "") -> SSHSettings:
        """How this provisioner reaches ``server`` (``ssh_server`` when empty) over SSH:
        its key, password reference, known hosts, host-key policy and connect timeout.
        The one place our ``ssh_*`` settings become :class:`SSHSettings`."""
        from .connection.sshconnect import SSHSettings

        return SSHSettings.from_server(
            server or self.ssh_server,
            key_file=self.ssh_key,
            password=self.secret("ssh_password"),
            known_hosts=self.ssh_known_hosts,
            accept_unknown_host_keys=self.ssh_accept_unknown_host_keys,
            connect_timeout=self.ssh_connect_timeout,
        )

    def secret(self, key: str) -> str:
        """The secret that setting ``key`` references ('' when unset)."""
        if key in self.resolved_secrets:
            return self.resolved_secrets[key]
        return resolve_reference(key, getattr(self, key), target=self.target)

    def config_error(self, key: str, problem: str) -> ProvisionerConfigError:
        """Build a config error for ``key`` of this provisioner."""
        msg = f"{self.target} provisioner config key {key!r}: {problem}"
        return ProvisionerConfigError(msg, key=key, target=self.target)


def kernelspec_name(kernel_spec: Any, parent: Any = None) -> str:
    """The kernelspec's name (its directory's name), not its display name.

    jupyter_client's KernelSpecManager leaves ``KernelSpec.name`` empty; the name is the
    basename of its resource dir, which is also the manager's ``kernel_name``.
    """
    resource_dir = str(getattr(kernel_spec, "resource_dir", "") or "").rstrip("/")
    return (
        getattr(kernel_spec, "name", "")
        or os.path.basename(resource_dir)
        or getattr(parent, "kernel_name", "")
        or getattr(kernel_spec, "display_name", "")
    )


def is_request_input(name: str) -> bool:
    """Whether a start request's variable ``name`` reaches a kernel that does not inherit
    the server's environment (``KERNEL_*`` values and ``JPY_SESSION_NAME``)."""
    return name.startswith("KERNEL_") or name == "JPY_SESSION_NAME"


def requested_env_names(env: dict[str, str] | None) -> set[str]:
    """Names the start request itself set: jupyter_server passes the server's environment
    along with them, so a value equal to the server's own is the server's."""
    return {k for k, v in (env or {}).items() if os.environ.get(k) != v}

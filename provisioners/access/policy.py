"""Who may do what: the access settings, kernel ownership, kernelspec groups, quotas."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from jupyter_server.auth import User
from tornado import web
from traitlets import Float, Int, List, TraitError, Unicode, default, validate
from traitlets.config import SingletonConfigurable

from ..parameters import parse_quantity


class AccessError(web.HTTPError):
    """An HTTP error whose message is the JSON reply's ``message`` as written (no
    %-formatting: user and kernelspec names may contain '%')."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message.replace("%", "%%"))
        self.message = message

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.message}"


@dataclass
class AccessUser(User):
    """A Jupyter Server user with the groups and the admin flag the access layer decides on."""

    groups: list[str] = field(default_factory=list)
    admin: bool = False


def memory_bytes(value: str) -> int:
    """Bytes of a memory quantity as Kubernetes writes it (``512Mi``, ``16Gi``, ``2G``);
    raises ``ValueError`` naming the value."""
    size = parse_quantity(value)
    if size is None:
        raise ValueError(f"not a memory quantity: {value!r} (e.g. 512Mi, 16Gi, 2G)")
    return size


def format_bytes(size: float) -> str:
    """``size`` bytes in the largest binary unit it fills (``16Gi``, ``1.5Gi``, ``300Mi``)."""
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size >= factor:
            return f"{size / factor:.4g}{unit}"
    return f"{size:g}"


@dataclass
class _Start:
    """A kernel start in flight: it counts against its user's quotas until it is live."""

    username: str
    cpu: float
    memory: int


class KernelAccess(SingletonConfigurable):
    """Access settings of a shared server (the ``provisioners.access`` extension) and the
    record of who started which kernel."""

    admin_users = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""User names that are admins: they see, attach to and stop every kernel and
        session, use every kernelspec, and no quota applies to them.""",
    )
    admin_groups = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Groups whose members are admins (groups from the token file, or the
        JupyterHub user model).""",
    )
    token_admin_name = Unicode(
        "admin",
        config=True,
        help="""User name of the server's own token (IdentityProvider.token, i.e.
        JUPYTER_TOKEN or the chart's token): an admin. Kernels started with that token get
        it as KERNEL_USERNAME. A token-file or JupyterHub user of this name who is not an
        admin is refused (they would own those kernels): choose a name no user has.""",
    )
    max_kernels_per_user = Int(
        0,
        min=0,
        config=True,
        help="""Most kernels one user may have running (or starting) at once; a start
        beyond it answers 429 saying the count. 0: no limit. Admins are exempt.""",
    )
    max_cpu_per_user = Float(
        0.0,
        min=0.0,
        config=True,
        help="""Most CPUs one user's running kernels may request in all (the sum of their
        resolved 'cpu' launch parameters); a start beyond it answers 403 saying the cap.
        0: no cap. A kernel whose kernelspec declares no 'cpu' parameter counts 0.""",
    )
    max_memory_per_user = Unicode(
        "",
        config=True,
        help="""Most memory one user's running kernels may request in all (the sum of
        their resolved 'memory' launch parameters), e.g. '16Gi'; a start beyond it answers
        403 saying the cap. Empty: no cap. A kernel whose kernelspec declares no 'memory'
        parameter counts 0.""",
    )
    token_file = Unicode(
        "",
        config=True,
        help="""JSON file mapping tokens to users, read again whenever it changes (a
        Kubernetes Secret mounted as a file works): {"<token>": {"name": "alice",
        "groups": ["team-a"], "admin": false}}. Clients send the token as
        'Authorization: token <token>' (a gateway client's GatewayClient.auth_token) or
        '?token=<token>'.""",
    )
    hub_api_url = Unicode(
        config=True,
        help="""JupyterHub's API URL (e.g. http://hub:8081/hub/api; default: the
        JUPYTERHUB_API_URL environment variable). When set, a token the token file does not
        know is resolved with GET {hub_api_url}/user, the way a Hub service does.""",
    )
    hub_service_name = Unicode(
        config=True,
        help="""Name of this server's JupyterHub service (default: JUPYTERHUB_SERVICE_NAME).
        A Hub token is accepted only with the scope access:services!service=<this name> or
        access:services; single-user servers' tokens carry it when the Hub grants it
        (c.Spawner.server_token_scopes).""",
    )
    hub_api_token = Unicode(
        config=True,
        help="""This service's own JupyterHub API token (default: JUPYTERHUB_API_TOKEN),
        used only to read a user's groups (GET {hub_api_url}/users/<name>, needs the scope
        read:users or read:users:groups) when the user's own token does not show them.""",
    )
    cache_ttl = Float(
        60.0,
        min=0.0,
        config=True,
        help="""Seconds a user resolved through JupyterHub is cached (per token): a
        removed token or a changed group takes effect within this time.""",
    )
    negative_cache_ttl = Float(
        5.0,
        min=0.0,
        config=True,
        help="""Seconds a token JupyterHub refused is remembered, so that a client
        retrying a bad token does not reach the Hub on every request.""",
    )
    hub_request_timeout = Float(
        10.0,
        min=0.1,
        config=True,
        help="""Seconds one request to JupyterHub's API may take; past it the request
        answers 503 (the Hub is unavailable).""",
    )

    @default("hub_api_url")
    def _hub_api_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    @default("hub_service_name")
    def _hub_service_name_default(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_NAME", "")

    @default("hub_api_token")
    def _hub_api_token_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @validate("max_memory_per_user")
    def _valid_memory(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        if value:
            try:
                memory_bytes(value)
            except ValueError as exc:
                raise TraitError(f"KernelAccess.max_memory_per_user: {exc}") from None
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: kernel id -> user name, for kernels the access layer started whose provisioner
        #: does not record a user (a non-cluster provisioner).
        self.owners: dict[str, str] = {}
        #: kernel id -> (cpu, memory bytes) requested, for the per-user caps.
        self.requests: dict[str, tuple[float, int]] = {}
        self._starting: dict[str, _Start] = {}

    # -- who --------------------------------------------------------------------------

    def is_admin(self, name: str, groups: list[str], flagged: bool = False) -> bool:
        """Whether a user with ``name`` and ``groups`` is an admin (``flagged``: the token
        file or the Hub says so)."""
        return flagged or name in self.admin_users or bool(set(groups) & set(self.admin_groups))

    def owner(self, km: Any, kernel_id: str) -> str | None:
        """The user who owns ``kernel_id``; "" when nobody does (admins only); None when
        the kernel manager has no such kernel."""
        if kernel_id not in km:
            self.forget(kernel_id)
            return None
        from ..lifecycle.base import ClusterProvisioner

        try:
            provisioner = getattr(km.get_kernel(kernel_id), "provisioner", None)
        except KeyError:
            return None
        if isinstance(provisioner, ClusterProvisioner):
            name = getattr(provisioner, "username", "") or ""
            if name:
                return str(name)
        return self.owners.get(kernel_id, "")

    def may_access(self, km: Any, user: Any, kernel_id: str) -> bool:
        """Whether ``user`` may see and use ``kernel_id`` (False for a missing kernel)."""
        owner = self.owner(km, kernel_id)
        if owner is None:
            return False
        return bool(getattr(user, "admin", False)) or (owner != "" and owner == user.username)

    def check_kernel(self, km: Any, user: Any, kernel_id: str) -> None:
        """Raise 404 as for a missing kernel unless ``user`` may use ``kernel_id``."""
        if not self.may_access(km, user, kernel_id):
            if kernel_id in km:  # for the admin reading the log; the reply says no more
                self.log.info("User %r refused kernel %s: not theirs", user.username, kernel_id)
            raise AccessError(404, f"Kernel does not exist: {kernel_id}")

    def forget(self, kernel_id: str) -> None:
        """Drop what is recorded about a kernel that is gone."""
        self.owners.pop(kernel_id, None)
        self.requests.pop(kernel_id, None)

    def prune(self, km: Any) -> None:
        """Forget the recorded kernels the kernel manager no longer has."""
        for kernel_id in [k for k in self.owners if k not in km and k not in self._starting]:
            self.forget(kernel_id)
        for kernel_id in [k for k in self.requests if k not in km and k not in self._starting]:
            self.forget(kernel_id)

    # -- kernelspecs ------------------------------------------------------------------

    @staticmethod
    def may_use_spec(user: Any, metadata: Mapping[str, Any] | None) -> bool:
        """Whether ``user`` may use a kernelspec with ``metadata`` (its
        ``allowed_groups``; empty or missing: everyone)."""
        if getattr(user, "admin", False):
            return True
        allowed = (metadata or {}).get("allowed_groups") or []
        if isinstance(allowed, str):
            allowed = [allowed]
        return not allowed or bool(set(allowed) & set(getattr(user, "groups", []) or []))

    # -- quotas -----------------------------------------------------------------------

    def _usage(self, km: Any, username: str, usage_of: Any) -> tuple[int, float, int]:
        count, cpu, memory = 0, 0.0, 0
        for kernel_id in list(km.list_kernel_ids()):
            if kernel_id in self._starting or self.owner(km, kernel_id) != username:
                continue
            count += 1
            kernel_cpu, kernel_memory = self.requests.get(kernel_id) or usage_of(kernel_id)
            cpu += kernel_cpu
            memory += kernel_memory
        for start in self._starting.values():
            if start.username == username:
                count += 1
                cpu += start.cpu
                memory += start.memory
        return count, cpu, memory

    @contextmanager
    def starting(
        self, km: Any, user: Any, kernel_id: str, cpu: float, memory: int, usage_of: Any
    ) -> Iterator[None]:
        """Check ``user``'s quotas for one more kernel requesting ``cpu`` and ``memory``
        and count it until the block ends (429/403 naming the count or cap);
        ``usage_of(kernel_id)`` gives (cpu, memory) of a live kernel not recorded here."""
        name = user.username
        if not getattr(user, "admin", False):
            count, used_cpu, used_memory = self._usage(km, name, usage_of)
            cap = self.max_kernels_per_user
            if cap and count >= cap:
                raise AccessError(
                    429,
                    f"Kernel limit reached: user {name!r} has {count} kernel(s), the most "
                    f"allowed per user is {cap} (KernelAccess.max_kernels_per_user). "
                    "Shut a kernel down first.",
                )
            cpu_cap = self.max_cpu_per_user
            if cpu_cap and used_cpu + cpu > cpu_cap + 1e-9:
                raise AccessError(
                    403,
                    f"CPU cap exceeded: user {name!r} has kernels requesting {used_cpu:g} "
                    f"CPU; {cpu:g} more would pass the cap of {cpu_cap:g} CPU per user "
                    "(KernelAccess.max_cpu_per_user).",
                )
            if self.max_memory_per_user:
                memory_cap = memory_bytes(self.max_memory_per_user)
                if used_memory + memory > memory_cap:
                    raise AccessError(
                        403,
                        f"Memory cap exceeded: user {name!r} has kernels requesting "
                        f"{format_bytes(used_memory)}; {format_bytes(memory)} more would pass "
                        f"the cap of {self.max_memory_per_user} per user "
                        "(KernelAccess.max_memory_per_user).",
                    )
        self._starting[kernel_id] = _Start(name, cpu, memory)
        self.owners[kernel_id] = name
        self.requests[kernel_id] = (cpu, memory)
        try:
            yield
        except BaseException:
            self.forget(kernel_id)
            raise
        finally:
            self._starting.pop(kernel_id, None)

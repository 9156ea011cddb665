"""Secrets in provisioner config are references, never literal values.

A kernelspec is world-readable and Jupyter Server serves it to every client at
``GET /api/kernelspecs``, so a setting that holds a secret (``ssh_password``, the SSH
target's ``password``) takes a reference instead:

- ``file:/path/to/secret``: a file of this server's user, readable by it alone (0600 or
  stricter); one trailing newline is dropped;
- ``env:NAME``: an environment variable of the server process;
- ``secret:NAME/KEY`` (Kubernetes target): key ``KEY`` of Secret ``NAME`` in the kernel's
  namespace.

A literal value is refused, when a kernelspec is installed and when a kernel starts, with
:func:`literal_secret_message`.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .exceptions import ProvisionerConfigError

FILE, ENV, KUBE_SECRET = "file:", "env:", "secret:"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KUBE_REF = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?)/([-._a-zA-Z0-9]+)")


def literal_secret_message(key: str) -> str:
    """What to use instead of a literal secret in ``key`` (the CLI and starts say the same)."""
    return (
        f"config key {key!r} holds a literal secret. Kernelspecs are world-readable and "
        "Jupyter Server serves them to every client at GET /api/kernelspecs, so secrets are "
        f"referenced, never stored: set {key!r} to 'file:/path/to/secret' (a file only you "
        "can read, mode 0600), 'env:VARIABLE' (an environment variable of the server) or, "
        "for Kubernetes kernels, 'secret:NAME/KEY' (a Secret in the kernel's namespace); "
        "or log in with a key instead of a password"
    )


def check_reference(key: str, value: str, *, target: str = "") -> None:
    """Raise :class:`ProvisionerConfigError` unless ``value`` is empty or a reference."""
    if not value:
        return
    if value.startswith(FILE) and value[len(FILE) :].strip():
        return
    if value.startswith(ENV) and _ENV_NAME.fullmatch(value[len(ENV) :]):
        return
    if value.startswith(KUBE_SECRET) and _KUBE_REF.fullmatch(value[len(KUBE_SECRET) :]):
        return
    raise ProvisionerConfigError(literal_secret_message(key), key=key, target=target)


def kube_secret_ref(value: str) -> tuple[str, str] | None:
    """(Secret name, key) of a ``secret:NAME/KEY`` reference, else None."""
    match = (
        _KUBE_REF.fullmatch(value[len(KUBE_SECRET) :]) if value.startswith(KUBE_SECRET) else None
    )
    return (match[1], match[3]) if match else None


def resolve_reference(key: str, value: str, *, target: str = "") -> str:
    """The secret a ``file:`` or ``env:`` reference names ('' for '').

    Raises :class:`ProvisionerConfigError` naming ``key`` when the file is missing, not a
    regular file, not this user's or readable by others, or the variable is unset. A
    ``secret:`` reference needs the Kubernetes API: its target resolves it.
    """
    check_reference(key, value, target=target)
    if not value:
        return ""
    if value.startswith(ENV):
        name = value[len(ENV) :]
        if name not in os.environ:
            problem = f"{key!r} names environment variable {name} of the server, which is unset"
            raise ProvisionerConfigError(problem, key=key, target=target)
        return os.environ[name]
    if value.startswith(FILE):
        return _read_secret_file(key, Path(value[len(FILE) :]).expanduser(), target)
    problem = f"{key!r}: a Kubernetes Secret reference ({value}) works with the kubernetes target"
    raise ProvisionerConfigError(problem, key=key, target=target)


def _read_secret_file(key: str, path: Path, target: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        problem = f"{key!r}: cannot open secret file {path}: {exc.strerror}"
        raise ProvisionerConfigError(problem, key=key, target=target) from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            problem = f"{key!r}: secret file {path} is not a regular file"
            raise ProvisionerConfigError(problem, key=key, target=target)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            problem = (
                f"{key!r}: secret file {path} is mode {oct(stat.S_IMODE(info.st_mode))} owned "
                f"by uid {info.st_uid}: it must be this user's (uid {os.getuid()}) and 0600"
            )
            raise ProvisionerConfigError(problem, key=key, target=target)
        data = handle.read().decode()
    return data[:-1] if data.endswith("\n") else data

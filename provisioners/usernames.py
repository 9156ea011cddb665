"""``{username}`` in a target's settings: the user's name made safe for each place.

A kernel's user (``KERNEL_USERNAME`` of the start request) may be any string an identity
provider hands out: ``Alice_B``, ``jürgen``, ``../etc``, 300 characters, an emoji. Two
mappings make it safe where it lands:

- :func:`dns_label` for Kubernetes names (a namespace, a claim, a volume's name): a
  DNS-1123 label, ``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63 characters;
- :func:`path_segment` for paths and Docker volume names: one segment,
  ``[A-Za-z0-9][A-Za-z0-9_.-]*``, never ``.``/``..``, ``/``, NUL or a control character.

Both keep a name that is already safe as it is, and map any other name to a readable
prefix, ``--`` and a hash of the exact name (65 bits, base32). A kept name never holds
``--`` (a name that does is mapped too), so a mapped name never equals a kept one, and two
mapped names are equal only if their hashes are: distinct users get distinct names, and
no one can choose a name that maps onto another user's. The empty name is refused.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from .exceptions import ProvisionerConfigError

__all__ = [
    "DNS_LABEL_MAX",
    "PATH_SEGMENT_MAX",
    "PLACEHOLDER",
    "UsernameError",
    "check_username",
    "dns_label",
    "expand_env",
    "expand_username",
    "path_segment",
    "settings_using_username",
    "uses_username",
]

#: What a setting writes where the user's name goes.
PLACEHOLDER = "{username}"
#: Longest DNS-1123 label (a namespace, a volume's name).
DNS_LABEL_MAX = 63
#: Longest path segment :func:`path_segment` gives (well under any file system's 255).
PATH_SEGMENT_MAX = 100

Style = Literal["dns", "path"]

_HASH_CHARS = 13  # base32 characters: 65 bits of sha256
_SEPARATOR = "--"
_DNS_KEPT = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PATH_KEPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DNS_RUNS = re.compile(r"[^a-z0-9]+")
_PATH_RUNS = re.compile(r"[^A-Za-z0-9_.]+")


class UsernameError(ProvisionerConfigError):
    """A user's name cannot go where a setting puts it: there is none (or it is empty)
    and the setting uses ``{username}``. ``key`` names the setting."""

    http_status = 400


def check_username(name: str) -> str:
    """``name`` if a kernel can carry it as ``KERNEL_USERNAME``; raises
    :class:`UsernameError` for a NUL character (no process environment can hold one: the
    start would fail late, in the runtime's words). '' passes (no user)."""
    if "\x00" in name:
        raise UsernameError(
            "the start request's KERNEL_USERNAME contains a NUL character, which no "
            "kernel environment can hold",
            key="KERNEL_USERNAME",
        )
    return name


def _hash(name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii")[:_HASH_CHARS].lower()


def _ascii(name: str) -> str:
    """``name`` in ASCII where a character has an ASCII base (``ü`` → ``u``), else dropped."""
    decomposed = unicodedata.normalize("NFKD", name)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def _require(name: str, setting: str) -> None:
    if not isinstance(name, str) or not name:
        where = f" (setting {setting!r} uses {PLACEHOLDER})" if setting else ""
        raise UsernameError(
            f"no username for this kernel{where}: the start request's KERNEL_USERNAME "
            "is empty or missing",
            key=setting,
        )


def _mapped(prefix: str, name: str, max_length: int, first: str) -> str:
    """``prefix`` (already reduced to safe characters), bounded, ``--`` and the hash."""
    room = max_length - len(_SEPARATOR) - _HASH_CHARS
    prefix = prefix[:room].rstrip("-._")
    if not prefix or prefix[0] not in first:
        prefix = ("u" + prefix)[:room].rstrip("-._")
    return f"{prefix}{_SEPARATOR}{_hash(name)}"


def dns_label(name: str, max_length: int = DNS_LABEL_MAX, *, setting: str = "") -> str:
    """``name`` as a DNS-1123 label of at most ``max_length`` (16..63) characters.

    A valid label without ``--`` that fits is kept; any other name is mapped (see the
    module docstring). Raises :class:`UsernameError` for an empty name.
    """
    _require(name, setting)
    max_length = max(16, min(max_length, DNS_LABEL_MAX))
    if len(name) <= max_length and _SEPARATOR not in name and _DNS_KEPT.fullmatch(name):
        return name
    prefix = _DNS_RUNS.sub("-", _ascii(name).lower()).strip("-")
    return _mapped(prefix, name, max_length, "abcdefghijklmnopqrstuvwxyz0123456789")


def path_segment(name: str, max_length: int = PATH_SEGMENT_MAX, *, setting: str = "") -> str:
    """``name`` as one safe path segment (also a valid Docker volume name).

    A name of ``[A-Za-z0-9][A-Za-z0-9_.-]*`` without ``--`` that fits is kept (so never
    ``.``, ``..``, ``/``, a control character or a leading ``-``); any other name is
    mapped (see the module docstring). Raises :class:`UsernameError` for an empty name.
    """
    _require(name, setting)
    max_length = max(16, min(max_length, 255))
    if len(name) <= max_length and _SEPARATOR not in name and _PATH_KEPT.fullmatch(name):
        return name
    prefix = _PATH_RUNS.sub("-", _ascii(name)).strip("-._")
    first = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return _mapped(prefix, name, max_length, first)


def uses_username(value: Any) -> bool:
    """True when ``value`` (a str, or lists/dicts of them, keys included) holds ``{username}``."""
    if isinstance(value, str):
        return PLACEHOLDER in value
    if isinstance(value, dict):
        return any(uses_username(k) or uses_username(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(uses_username(item) for item in value)
    return False


def expand_username(
    value: Any,
    username: str,
    style: Style,
    *,
    setting: str = "",
    path_keys: Iterable[str] = (),
) -> Any:
    """``value`` with ``{username}`` replaced by the user's safe name, in ``style``.

    ``value`` is a str, or lists/tuples/dicts of them (dict keys are expanded too: Docker's
    ``volumes`` are keyed by source); anything else is returned as it is. ``style`` is
    ``"dns"`` (:func:`dns_label`) or ``"path"`` (:func:`path_segment`); under a dict key in
    ``path_keys`` (``mountPath``, ``path``...) strings take the path style whatever
    ``style`` says. In the dns style, a string's name is bounded so that the whole string
    stays a label when the rest of it is short (``kernels-{username}``).

    Only the placeholder is replaced (no ``str.format``: other braces stay as they are).
    A value without ``{username}`` is returned unchanged, with or without a username.
    Raises :class:`UsernameError` naming ``setting`` when the value uses ``{username}``
    and ``username`` is empty.
    """
    if style not in ("dns", "path"):
        raise ValueError(f"unknown username style {style!r}: 'dns' or 'path'")
    if not uses_username(value):
        return value
    _require(username, setting)
    return _expand(value, username, style, setting, frozenset(path_keys))


def _expand(
    value: Any, username: str, style: Style, setting: str, path_keys: frozenset[str]
) -> Any:
    if isinstance(value, str):
        if PLACEHOLDER not in value:
            return value
        if style == "path":
            safe = path_segment(username, setting=setting)
        else:
            count = value.count(PLACEHOLDER)
            rest = len(value) - len(PLACEHOLDER) * count
            safe = dns_label(username, (DNS_LABEL_MAX - rest) // count, setting=setting)
        return value.replace(PLACEHOLDER, safe)
    if isinstance(value, dict):
        return {
            _expand(k, username, style, setting, path_keys): _expand(
                v, username, "path" if k in path_keys else style, setting, path_keys
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(item, username, style, setting, path_keys) for item in value]
    if isinstance(value, tuple):
        return tuple(_expand(item, username, style, setting, path_keys) for item in value)
    return value


def expand_env(env: dict[str, str], configured: Mapping[str, str], username: str) -> dict[str, str]:
    """The kernel's ``env`` with the values the settings' ``env`` (``configured``) gives
    expanded in the path style (``HOME=/home/{username}``); the request's own values are
    left as they are. Raises :class:`UsernameError` naming ``env`` without a username."""
    out = dict(env)
    for name, value in configured.items():
        if name in out and uses_username(value):
            out[name] = expand_username(str(value), username, "path", setting=f"env.{name}")
    return out


def settings_using_username(settings: Any) -> list[str]:
    """Names of a provisioner's settings that vary by user: those of its
    ``username_settings`` that use ``{username}`` (or what its own
    ``settings_using_username()`` says, where it has one)."""
    own = getattr(settings, "settings_using_username", None)
    if callable(own):
        return list(own())
    names = getattr(settings, "username_settings", ())
    return [name for name in names if uses_username(getattr(settings, name, None))]

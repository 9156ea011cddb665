"""Launch parameters: values a start request chooses within what a kernelspec declares.

A kernelspec declares its parameters in kernel.json ``metadata.parameters``, a subset of
JSON Schema, one entry per parameter::

    "parameters": {
      "cpu": {"type": "number", "minimum": 0.5, "maximum": 4, "default": 1},
      "memory": {"type": "string", "maximum": "8Gi", "default": "2Gi"},
      "gpus": {"type": "integer", "minimum": 0, "maximum": 1, "default": 0},
      "image": {"type": "string", "enum": ["kernel:py3", "kernel:gpu"], "default": "kernel:py3"},
      "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"}
    }

Keys of an entry: ``type`` (number, integer, string, boolean; required), ``default``
(required), ``minimum``/``maximum`` (numbers; for ``memory`` quantities such as "512Mi",
"2Gi", "1G", compared as bytes), ``enum``, ``pattern`` (strings, matched whole),
``description`` and ``title``. ``cpu``, ``memory`` and ``gpus`` need a ``maximum``, and
``image`` an ``enum``. A bad schema is a :class:`ProvisionerConfigError` naming the
kernelspec and the key.

A request supplies values in its environment, ``KERNEL_<NAME>`` (``KERNEL_CPU=2``; strings
parsed per type), or as a JSON ``parameters`` object (:func:`resolve_parameters`'s
``supplied``, which wins). The server admin's :class:`LaunchBounds` apply on top of every
schema. A bad value is a :class:`LaunchParameterError` (HTTP 400) naming the parameter and
what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from traitlets import Float, Int, List, TraitError, Unicode, validate
from traitlets.config import SingletonConfigurable

from .exceptions import ProvisionerConfigError
from .settings import kernelspec_name

#: The parameters a target maps onto its own settings (the rest become env variables).
RESOURCE_PARAMETERS = ("cpu", "memory", "gpus", "image")
#: Names a parameter cannot have: their ``KERNEL_*`` variables mean something else.
RESERVED_NAMES = frozenset({"username", "id"})
TYPES = ("number", "integer", "string", "boolean")
SCHEMA_KEYS = frozenset(
    {"type", "default", "minimum", "maximum", "enum", "pattern", "description", "title"}
)
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_ENV_NAME = re.compile(r"KERNEL_[A-Z][A-Z0-9_]{0,39}")
#: Longest record of a kernel's launch values an engine keeps (a label or annotation).
_MAX_RECORD = 16_384
_NUMBER = re.compile(
    r"[+-]?(?:[0-9]{1,16}(?:\.[0-9]{0,16})?|\.[0-9]{1,16})(?:[eE][+-]?[0-9]{1,3})?"
)
_INTEGER = re.compile(r"[+-]?[0-9]{1,16}")
_QUANTITY = re.compile(r"([0-9]{1,16}(?:\.[0-9]{1,9})?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
#: Largest magnitude of a number or integer value, and of a memory size in bytes.
MAX_NUMBER = 2**53
MAX_STRING = 256


class LaunchParameterError(ProvisionerConfigError):
    """A start request's launch parameter value is not allowed (HTTP 400).

    ``parameter`` names the parameter; the message says what is allowed and is fit for an
    HTTP reply (a hostile value is quoted shortened).
    """

    http_status = 400

    def __init__(self, message: str, *, parameter: str, kernel_spec: str = "") -> None:
        super().__init__(message, key=parameter, kernel_spec=kernel_spec)
        self.parameter = parameter


class LaunchBounds(SingletonConfigurable):
    """The server admin's bounds on every kernelspec's launch parameters.

    They apply on top of each schema, to supplied values and to the schemas' defaults
    alike. Set them in the server's config: ``c.LaunchBounds.max_cpu = 4``.
    """

    max_cpu = Float(
        None,
        allow_none=True,
        config=True,
        help="""Most CPUs a kernel's 'cpu' parameter may ask for, whatever its kernelspec
        allows. None: the kernelspec's maximum only. Example: 4.""",
    )
    max_memory = Unicode(
        "",
        config=True,
        help="""Most memory a kernel's 'memory' parameter may ask for, as a quantity
        ('512Mi', '8Gi', '1G'; compared as bytes). Empty: the kernelspec's maximum only.""",
    )
    max_gpus = Int(
        None,
        allow_none=True,
        config=True,
        help="""Most GPUs a kernel's 'gpus' parameter may ask for. None: the kernelspec's
        maximum only. 0 refuses any GPU.""",
    )
    allowed_images = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Images a kernel's 'image' parameter may name, on top of each kernelspec's
        own enum. Empty: the kernelspec's enum only. Example: ["kernel:py3"].""",
    )

    @validate("max_memory")
    def _check_max_memory(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if value and parse_quantity(value) is None:
            msg = f"max_memory {value!r} is not a quantity such as '512Mi', '8Gi' or '1G'"
            raise TraitError(msg)
        return value


@dataclass(frozen=True)
class LaunchParameters:
    """A kernel's resolved launch parameters.

    ``values`` holds every declared parameter (defaults filled); ``defaults`` is true
    when all of them are their kernelspec's defaults (a warm kernel may serve the start).
    ``cpu``, ``memory_bytes``, ``gpus`` and ``image`` are the resource parameters, None
    when the kernelspec does not declare them. ``changed`` names the values that differ
    from the defaults.
    """

    values: dict[str, Any] = field(default_factory=dict)
    defaults: bool = True
    cpu: float | None = None
    memory_bytes: int | None = None
    gpus: int | None = None
    image: str | None = None
    changed: tuple[str, ...] = ()

    def describe_changes(self) -> str:
        """``cpu=2, memory='4Gi'``: the values that differ from the defaults."""
        return ", ".join(f"{n}={_show(self.values[n])}" for n in self.changed)

    def env(self, names: Any = None) -> dict[str, str]:
        """``KERNEL_<NAME>`` variables of the values (of ``names``, default all)."""
        chosen = self.values if names is None else names
        return {env_name(n): env_value(self.values[n]) for n in chosen}

    def other_env(self) -> dict[str, str]:
        """``KERNEL_<NAME>`` variables of the parameters that are not resources: what the
        kernel gets in its environment."""
        return self.env([n for n in self.values if n not in RESOURCE_PARAMETERS])


def env_name(name: str) -> str:
    """The environment variable of parameter ``name``: ``KERNEL_<NAME>``."""
    return f"KERNEL_{name.upper()}"


def env_value(value: Any) -> str:
    """A value as its environment string (booleans 'true'/'false')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_quantity(text: str) -> int | None:
    """Bytes of a memory quantity ('512Mi', '2Gi', '1G', '1048576'); None when invalid.

    Strict: no spaces, no exponent, suffixes as Kubernetes writes them (``G`` = 10^9,
    ``Gi`` = 2^30); fractions round up to a whole byte.
    """
    match = _QUANTITY.fullmatch(text)
    if match is None:
        return None
    try:
        number = Decimal(match.group(1)) * _UNITS[match.group(2) or ""]
    except InvalidOperation:
        return None
    return int(number.to_integral_value(rounding=ROUND_CEILING))


def resolve_parameters(
    kernel_spec: Any,
    env: Mapping[str, str] | None,
    supplied: Mapping[str, Any] | None = None,
    *,
    bounds: LaunchBounds | None = None,
) -> LaunchParameters:
    """Validate a start request's launch parameters against ``kernel_spec``'s schema and
    the admin's ``bounds`` (default: the :class:`LaunchBounds` singleton).

    Values come from ``supplied`` (a request body's ``parameters`` object) or ``env``
    (``KERNEL_<NAME>``); ``supplied`` wins. Raises :class:`ProvisionerConfigError` for a
    bad schema (naming the kernelspec and the key) and :class:`LaunchParameterError` for a
    bad value, an unknown name in ``supplied`` or a default outside the admin's bounds.
    """
    spec_name = kernelspec_name(kernel_spec)
    schema = _schema(kernel_spec, spec_name)
    env = env or {}
    supplied = dict(supplied or {})
    if bounds is None:
        bounds = LaunchBounds.instance()
    unknown = sorted(str(name) for name in supplied if name not in schema)
    if unknown:
        known = ", ".join(sorted(schema)) or "none"
        msg = (
            f"unknown launch parameter {_show(unknown[0])}{_of(spec_name)}; "
            f"known parameters: {known}"
        )
        raise LaunchParameterError(msg, parameter=unknown[0][:64], kernel_spec=spec_name)
    values: dict[str, Any] = {}
    changed = []
    for name, entry in schema.items():
        if name in supplied:
            value = _value(name, entry, supplied[name], spec_name)
        elif env_name(name) in env:
            value = _value(name, entry, env[env_name(name)], spec_name)
        else:
            value = entry["default"]
        _check_bounds(name, entry, value, bounds, spec_name)
        values[name] = value
        if _key(name, value) != _key(name, entry["default"]):
            changed.append(name)
    memory = values.get("memory")
    return LaunchParameters(
        values=values,
        defaults=not changed,
        cpu=float(values["cpu"]) if "cpu" in values else None,
        memory_bytes=_bytes(memory) if memory is not None else None,
        gpus=int(values["gpus"]) if "gpus" in values else None,
        image=str(values["image"]) if "image" in values else None,
        changed=tuple(changed),
    )


def unsupported_resources(
    params: LaunchParameters, supported: Any, spec_name: str, target: str
) -> ProvisionerConfigError | None:
    """A :class:`ProvisionerConfigError` naming the first resource parameter of ``params``
    that ``target`` cannot honour (not in ``supported``), or None."""
    for name in RESOURCE_PARAMETERS:
        if name in params.values and name not in supported:
            can = ", ".join(n for n in RESOURCE_PARAMETERS if n in supported) or "none"
            msg = (
                f"kernelspec {spec_name!r}: launch parameter {name!r} cannot be applied to "
                f"{target} kernels (resource parameters they honour: {can}); remove it from "
                "metadata.parameters"
            )
            return ProvisionerConfigError(
                msg, key=f"parameters.{name}", kernel_spec=spec_name, target=target
            )
    return None


def encode_launch_env(params: LaunchParameters | None) -> str:
    """The values of ``params`` that differ from the defaults, as a JSON object of
    ``KERNEL_<NAME>`` strings for an engine's record of the kernel ('' for defaults), so
    that the server that adopts the kernel restarts it with them."""
    if params is None or not params.changed:
        return ""
    return json.dumps(params.env(params.changed), sort_keys=True, separators=(",", ":"))


def decode_launch_env(text: Any) -> dict[str, str]:
    """:func:`encode_launch_env`'s values read back from an engine's record; {} when
    absent or malformed (the kernelspec's defaults then apply)."""
    if not isinstance(text, str) or not text or len(text) > _MAX_RECORD:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        k: v
        for k, v in found.items()
        if isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str)
    }


def fallback_refusal(params: LaunchParameters | None, target: str, cause: str) -> str:
    """Why the local fallback may not stand in for a ``target`` kernel whose request chose
    resource parameters other than the defaults ('' when it may): a local process gets
    none of them, and a choice is never ignored silently."""
    if params is None:
        return ""
    chosen = [n for n in params.changed if n in RESOURCE_PARAMETERS]
    if not chosen:
        return ""
    values = ", ".join(f"{n}={_show(params.values[n])}" for n in chosen)
    return (
        f"the {target} engine is unreachable ({cause}); the local fallback cannot give the "
        f"kernel its launch parameters ({values}), so it is not started. Start it with the "
        "kernelspec's defaults, or once the engine answers"
    )


# ---------------------------------------------------------------------- the schema


def _schema(kernel_spec: Any, spec_name: str) -> dict[str, dict[str, Any]]:
    """The kernelspec's checked parameter schema ({} when it declares none)."""
    metadata = getattr(kernel_spec, "metadata", None) or {}
    if isinstance(kernel_spec, Mapping):
        metadata = kernel_spec.get("metadata") or {}
    declared = metadata.get("parameters")
    if declared is None:
        return {}
    if not isinstance(declared, Mapping):
        raise _schema_error(spec_name, "parameters", "must be an object of parameter schemas")
    schema = {}
    for name, entry in declared.items():
        key = f"parameters.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problem = "a parameter name is 1-40 lowercase letters, digits or '_', from a letter"
            raise _schema_error(spec_name, key, problem)
        if name in RESERVED_NAMES:
            raise _schema_error(spec_name, key, f"{env_name(name)} is reserved")
        if not isinstance(entry, Mapping):
            raise _schema_error(spec_name, key, "must be an object ({'type': ..., ...})")
        schema[name] = _check_entry(name, dict(entry), spec_name)
    return schema


def _check_entry(name: str, entry: dict[str, Any], spec: str) -> dict[str, Any]:
    key = f"parameters.{name}"
    extra = sorted(set(entry) - SCHEMA_KEYS)
    if extra:
        problem = f"unknown key {extra[0]!r}; known keys: {', '.join(sorted(SCHEMA_KEYS))}"
        raise _schema_error(spec, f"{key}.{extra[0]}", problem)
    kind = entry.get("type")
    allowed_types = {
        "cpu": ("number", "integer"),
        "memory": ("string", "integer"),
        "gpus": ("integer",),
        "image": ("string",),
    }.get(name, TYPES)
    if kind not in allowed_types:
        raise _schema_error(spec, f"{key}.type", f"must be one of {', '.join(allowed_types)}")
    for word in ("description", "title"):
        if word in entry and not isinstance(entry[word], str):
            raise _schema_error(spec, f"{key}.{word}", "must be a string")
    bounded = kind in ("number", "integer") or name == "memory"
    for word in ("minimum", "maximum"):
        if word not in entry:
            continue
        if not bounded:
            raise _schema_error(spec, f"{key}.{word}", f"not allowed for a {kind}")
        try:
            _bound_key(name, entry[word])
        except ValueError as exc:
            raise _schema_error(spec, f"{key}.{word}", str(exc)) from None
    both = "minimum" in entry and "maximum" in entry
    if both and _bound_key(name, entry["minimum"]) > _bound_key(name, entry["maximum"]):
        raise _schema_error(spec, f"{key}.minimum", "is above the maximum")
    if name in ("cpu", "memory", "gpus") and "maximum" not in entry and "enum" not in entry:
        raise _schema_error(spec, f"{key}.maximum", f"required for {name!r} (or an enum)")
    if "pattern" in entry:
        if kind != "string" or name == "memory" or not isinstance(entry["pattern"], str):
            raise _schema_error(spec, f"{key}.pattern", "a regular expression, for strings")
        try:
            re.compile(entry["pattern"])
        except re.error as exc:
            problem = f"is not a regular expression: {exc}"
            raise _schema_error(spec, f"{key}.pattern", problem) from None
    checked = dict(entry, enum=None)
    if "enum" in entry:
        options = entry["enum"]
        if not isinstance(options, list) or not options:
            raise _schema_error(spec, f"{key}.enum", "must be a non-empty list")
        try:
            checked["enum"] = [_value(name, checked, v, spec) for v in options]
        except LaunchParameterError as exc:
            raise _schema_error(spec, f"{key}.enum", str(exc)) from None
    elif name == "image":
        raise _schema_error(spec, f"{key}.enum", "required: the images a request may choose")
    if "default" not in entry:
        raise _schema_error(spec, f"{key}.default", "required")
    try:
        checked["default"] = _value(name, checked, entry["default"], spec)
    except LaunchParameterError as exc:
        raise _schema_error(spec, f"{key}.default", str(exc)) from None
    return checked


def _schema_error(spec_name: str, key: str, problem: str) -> ProvisionerConfigError:
    msg = f"kernelspec {spec_name!r}: metadata.{key} {problem}"
    return ProvisionerConfigError(msg, key=key, kernel_spec=spec_name)


def _bound_key(name: str, bound: Any) -> float:
    """A minimum or maximum as a comparable number (memory: bytes); ValueError if bad."""
    if name == "memory":
        size = _bytes(bound)
        if size is None:
            raise ValueError(f"{_show(bound)} is not a quantity such as '512Mi', '2Gi', '1G'")
        return float(size)
    if isinstance(bound, bool) or not isinstance(bound, int | float):
        raise ValueError(f"{_show(bound)} is not a number")
    if isinstance(bound, float) and not math.isfinite(bound):
        raise ValueError(f"{_show(bound)} is not a finite number")
    if abs(bound) > MAX_NUMBER:
        raise ValueError(f"{_show(bound)} is too large")
    return float(bound)


# ---------------------------------------------------------------------- values


def _value(name: str, entry: dict[str, Any], raw: Any, spec: str) -> Any:
    """``raw`` (a JSON value or an environment string) checked against ``entry``."""
    value = _typed(name, entry, raw, spec)
    if name == "memory":
        _bytes_or_fail(name, value, entry, spec)
    options = entry.get("enum")
    if options is not None and _key(name, value) not in [_key(name, o) for o in options]:
        raise _value_error(name, raw, entry, spec, "is not one of the allowed values")
    if "minimum" in entry and _key(name, value) < _bound_key(name, entry["minimum"]):
        raise _value_error(name, raw, entry, spec, "is below the minimum")
    if "maximum" in entry and _key(name, value) > _bound_key(name, entry["maximum"]):
        raise _value_error(name, raw, entry, spec, "is above the maximum")
    if name in ("cpu", "memory") and _key(name, value) <= 0:
        raise _value_error(name, raw, entry, spec, "must be above 0")
    if name == "memory" and _key(name, value) > MAX_NUMBER:
        raise _value_error(name, raw, entry, spec, "is too large")
    if name == "gpus" and value < 0:
        raise _value_error(name, raw, entry, spec, "must be 0 or more")
    pattern = entry.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise _value_error(name, raw, entry, spec, "does not match the pattern")
    return value


def _typed(name: str, entry: dict[str, Any], raw: Any, spec: str) -> Any:
    """``raw`` as a value of the entry's type; a string is parsed (an environment value)."""
    kind, given, value = entry["type"], raw, raw
    if isinstance(raw, str) and kind != "string":
        if kind == "boolean" and raw.lower() in _BOOLEANS:
            return _BOOLEANS[raw.lower()]
        if kind == "integer" and _INTEGER.fullmatch(raw):
            value = int(raw)
        elif kind == "number" and _NUMBER.fullmatch(raw):
            value = int(raw) if _INTEGER.fullmatch(raw) else float(raw)
        else:
            raise _value_error(name, given, entry, spec, f"is not {_article(kind)}")
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _value_error(name, given, entry, spec, "is not a boolean")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise _value_error(name, given, entry, spec, "is not a string")
        if len(value) > MAX_STRING or any(ord(c) < 32 or ord(c) == 127 for c in value):
            problem = f"is not a string of at most {MAX_STRING} printable characters"
            raise _value_error(name, given, entry, spec, problem)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _value_error(name, given, entry, spec, f"is not {_article(kind)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _value_error(name, given, entry, spec, "is not a finite number")
    if abs(value) > MAX_NUMBER:
        raise _value_error(name, given, entry, spec, "is too large")
    if kind == "integer":
        if isinstance(value, float) and not value.is_integer():
            raise _value_error(name, given, entry, spec, "is not an integer")
        return int(value)
    return value


def _bytes(value: Any) -> int | None:
    """Bytes of a memory value (a quantity string or an integer of bytes), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        return parse_quantity(value)
    return None


def _bytes_or_fail(name: str, value: Any, entry: dict[str, Any], spec: str) -> int:
    size = _bytes(value)
    if size is None:
        problem = "is not a memory quantity such as '512Mi', '2Gi' or '1G'"
        raise _value_error(name, value, entry, spec, problem)
    return size


def _key(name: str, value: Any) -> Any:
    """What two values of parameter ``name`` compare by (memory: bytes)."""
    if name == "memory":
        size = _bytes(value)
        return -1 if size is None else size
    return value


def _check_bounds(
    name: str, entry: dict[str, Any], value: Any, bounds: LaunchBounds, spec: str
) -> None:
    """The admin's bounds, on top of the schema."""
    problem, limit = "", ""
    if name == "cpu" and bounds.max_cpu is not None and value > bounds.max_cpu:
        problem, limit = "is above the server's max_cpu", _show(bounds.max_cpu)
    elif name == "memory" and bounds.max_memory:
        most = parse_quantity(bounds.max_memory)
        if most is not None and _key(name, value) > most:
            problem, limit = "is above the server's max_memory", _show(bounds.max_memory)
    elif name == "gpus" and bounds.max_gpus is not None and value > bounds.max_gpus:
        problem, limit = "is above the server's max_gpus", _show(bounds.max_gpus)
    elif name == "image" and bounds.allowed_images and value not in bounds.allowed_images:
        problem = "is not in the server's allowed_images"
        limit = ", ".join(_show(i) for i in bounds.allowed_images)
    if problem:
        msg = f"launch parameter {name!r}{_of(spec)}: {_show(value)} {problem} ({limit})"
        raise LaunchParameterError(msg, parameter=name, kernel_spec=spec)


def _value_error(
    name: str, raw: Any, entry: dict[str, Any], spec: str, problem: str
) -> LaunchParameterError:
    msg = (
        f"launch parameter {name!r}{_of(spec)}: {_show(raw)} {problem}; "
        f"allowed: {_allowed(name, entry)}"
    )
    return LaunchParameterError(msg, parameter=name, kernel_spec=spec)


def _allowed(name: str, entry: dict[str, Any]) -> str:
    """What a parameter accepts, in words."""
    kind = entry["type"]
    what = "a memory quantity such as '2Gi'" if name == "memory" else _article(kind)
    if kind == "boolean":
        return "true or false"
    if entry.get("enum"):
        return "one of " + ", ".join(_show(o) for o in entry["enum"])
    parts = [what]
    if "minimum" in entry:
        parts.append(f"from {_show(entry['minimum'])}")
    if "maximum" in entry:
        parts.append(f"up to {_show(entry['maximum'])}")
    if entry.get("pattern"):
        parts.append(f"matching {_show(entry['pattern'])}")
    return " ".join(parts)


def _of(spec: str) -> str:
    return f" of kernelspec {spec!r}" if spec else ""


def _article(kind: str) -> str:
    return {"integer": "an integer"}.get(kind, f"a {kind}")


def _show(value: Any) -> str:
    """A value quoted for a message, shortened (it may be hostile)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_NUMBER:
        value = int(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""API machinery of the double: Status errors, timestamps, name and label validation,
quantities, and label/field selectors, shaped after the Kubernetes API conventions."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

JSON = dict[str, Any]


class ApiError(Exception):
    """An API failure answered as a ``v1 Status`` body with ``code``."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        """The Status object sent to the client."""
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def success_status(resource: str, name: str, uid: str) -> JSON:
    """The Status a DELETE returns for resources that do not return the deleted object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": resource, "uid": uid},
    }


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource}
    )


def already_exists(resource: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{resource} "{name}" already exists',
        {"name": name, "kind": resource},
    )


def conflict(resource: str, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": {why}',
        {"name": name, "kind": resource},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def unknown_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def invalid(kind: str, name: str, causes: list[JSON]) -> ApiError:
    """422 Invalid; ``causes`` are ``{"reason", "message", "field"}`` dicts."""
    parts = [f"{c['field']}: {c['message']}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {joined}',
        {"name": name, "kind": kind, "causes": causes},
    )


def cause(reason: str, field: str, message: str) -> JSON:
    return {"reason": reason, "message": message, "field": field}


def invalid_value(field: str, value: Any, why: str) -> JSON:
    return cause("FieldValueInvalid", field, f"Invalid value: {_go_quote(value)}: {why}")


def required(field: str) -> JSON:
    return cause("FieldValueRequired", field, "Required value")


def not_supported(field: str, value: Any, allowed: Iterable[str]) -> JSON:
    supported = ", ".join(f'"{a}"' for a in allowed)
    return cause(
        "FieldValueNotSupported",
        field,
        f"Unsupported value: {_go_quote(value)}: supported values: {supported}",
    )


def duplicate(field: str, value: Any) -> JSON:
    return cause("FieldValueDuplicate", field, f"Duplicate value: {_go_quote(value)}")


def field_not_found(field: str, value: Any) -> JSON:
    return cause("FieldValueNotFound", field, f"Not found: {_go_quote(value)}")


def forbidden_field(field: str, why: str) -> JSON:
    return cause("FieldValueForbidden", field, f"Forbidden: {why}")


def _go_quote(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- time -------------------------------------------------------------------------------


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(when: _dt.datetime | None = None) -> str:
    """``metav1.Time``: seconds precision, ``Z`` suffix."""
    return (when or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(when: _dt.datetime | None = None) -> str:
    """``metav1.MicroTime``: microseconds precision."""
    return (when or utcnow()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_docker_time(value: str | None) -> str | None:
    """Docker's RFC3339Nano timestamps to ``metav1.Time``; ``None`` for the zero time."""
    if not value or value.startswith("0001-"):
        return None
    return value[:19] + "Z"


# --- names and labels -------------------------------------------------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(rf"^{_LABEL}$")
DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def subdomain_problem(value: str) -> str | None:
    """Why ``value`` is not an RFC 1123 subdomain (max 253), or None."""
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not DNS1123_SUBDOMAIN.match(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric "
            "character (regex used for validation is "
            f"'{_LABEL}(\\.{_LABEL})*')"
        )
    return None


def label_name_problem(value: str) -> str | None:
    """Why ``value`` is not an RFC 1123 label (max 63), or None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not DNS1123_LABEL.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric "
            "characters or '-', and must start and end with an alphanumeric character "
            f"(regex used for validation is '{_LABEL}')"
        )
    return None


def validate_labels(labels: Any, field: str) -> list[JSON]:
    """Causes for invalid label keys and values under ``field``."""
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [invalid_value(field, str(labels), "must be a map of strings")]
    causes = []
    for key, value in labels.items():
        problem = qualified_name_problem(str(key))
        if problem:
            causes.append(invalid_value(field, key, problem))
        if not isinstance(value, str):
            causes.append(invalid_value(f"{field}[{key}]", str(value), "must be a string"))
        elif len(value) > 63:
            causes.append(invalid_value(field, value, "must be no more than 63 characters"))
        elif not _LABEL_VALUE.match(value):
            causes.append(
                invalid_value(
                    field,
                    value,
                    "a valid label must be an empty string or consist of alphanumeric "
                    "characters, '-', '_' or '.', and must start and end with an "
                    "alphanumeric character",
                )
            )
    return causes


def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a qualified name (``[prefix/]name``), or None."""
    prefix, _, name = key.rpartition("/")
    if prefix:
        sub = subdomain_problem(prefix)
        if sub:
            return f"prefix part {sub}"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character"
        )
    return None


def config_key_problem(key: str) -> str | None:
    if len(key) > 253 or not _CONFIG_KEY.match(key) or key in (".", ".."):
        return "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
    return None


# --- quantities -------------------------------------------------------------------------

_SUFFIXES = {
    "Ki": Decimal(1024),
    "Mi": Decimal(1024**2),
    "Gi": Decimal(1024**3),
    "Ti": Decimal(1024**4),
    "Pi": Decimal(1024**5),
    "Ei": Decimal(1024**6),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def parse_quantity(value: Any) -> Decimal:
    """A resource.Quantity (``"500m"``, ``"1Gi"``, ``2``) as a Decimal; ValueError if bad."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"quantities must match the regular expression: {value!r}")
    number, exponent, suffix = match.groups()
    try:
        base = Decimal(number + (exponent or ""))
    except InvalidOperation as exc:
        raise ValueError(f"invalid quantity {value!r}") from exc
    return base * _SUFFIXES[suffix or ""]


# --- selectors --------------------------------------------------------------------------

Predicate = Callable[[JSON], bool]


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_SET_REQ = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")
_EQ_REQ = re.compile(r"^([^=!\s]+)\s*(==|=|!=)\s*(\S*)$")


def parse_label_selector(text: str | None) -> Predicate:
    """A predicate over objects for a label selector (``=``, ``==``, ``!=``, ``in``,
    ``notin``, ``key``, ``!key``); ApiError 400 when it cannot be parsed."""
    if not text:
        return lambda _obj: True
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top_level(text):
        set_match = _SET_REQ.match(part)
        eq_match = _EQ_REQ.match(part)
        if set_match:
            key, op, raw = set_match.groups()
            values = {v.strip() for v in raw.split(",") if v.strip()}
            if op == "in":
                tests.append(lambda lb, k=key, vs=values: k in lb and lb[k] in vs)
            else:
                tests.append(lambda lb, k=key, vs=values: k not in lb or lb[k] not in vs)
        elif eq_match:
            key, op, value = eq_match.groups()
            if op == "!=":
                tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                tests.append(lambda lb, k=key, v=value: k in lb and lb[k] == v)
        elif part.startswith("!") and qualified_name_problem(part[1:].strip()) is None:
            absent = part[1:].strip()
            tests.append(lambda lb, k=absent: k not in lb)
        elif qualified_name_problem(part) is None:
            tests.append(lambda lb, k=part: k in lb)
        else:
            raise bad_request(f"unable to parse requirement: found '{part}', expected: key")

    def predicate(obj: JSON) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(test(labels) for test in tests)

    return predicate


def parse_field_selector(text: str | None, fields: Callable[[JSON], dict[str, str]]) -> Predicate:
    """A predicate for a field selector over the fields ``fields(obj)`` exposes;
    ApiError 400 for unsupported field labels, like the apiserver."""
    if not text:
        return lambda _obj: True
    reqs: list[tuple[str, str, str]] = []
    for part in _split_top_level(text):
        match = _EQ_REQ.match(part)
        if not match:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        reqs.append(match.groups())  # type: ignore[arg-type]

    def predicate(obj: JSON) -> bool:
        values = fields(obj)
        for key, op, value in reqs:
            if key not in values:
                raise bad_request(f"field label not supported: {key}")
            if (values[key] == value) == (op == "!="):
                return False
        return True

    # Reject unsupported labels up front even when there is nothing to match against.
    probe = fields({})
    for key, _op, _value in reqs:
        if key not in probe:
            raise bad_request(f"field label not supported: {key}")
    return predicate

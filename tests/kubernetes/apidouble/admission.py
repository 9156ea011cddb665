"""Admission of written objects: metadata validation and per-resource defaulting and
validation (pods, secrets, configmaps, namespaces, events), plus discovery documents."""

from __future__ import annotations

import base64
import binascii
import copy
from typing import Any

from . import meta, podspec
from .cluster import namespace_object
from .meta import JSON, bad_request
from .store import RESOURCES, Resource

VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-k8s-double",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def validate_meta(res: Resource, md: JSON) -> list[JSON]:
    """Causes for an invalid name, labels, annotations or owner references."""
    name = md.get("name") or ""
    if not name:
        return [
            meta.cause(
                "FieldValueRequired",
                "metadata.name",
                "Required value: name or generateName is required",
            )
        ]
    problem = (
        meta.label_name_problem(name) if res.name == "namespaces" else meta.subdomain_problem(name)
    )
    causes = [meta.invalid_value("metadata.name", name, problem)] if problem else []
    causes += meta.validate_labels(md.get("labels"), "metadata.labels")
    for key in md.get("annotations") or {}:
        if problem := meta.qualified_name_problem(str(key)):
            causes.append(meta.invalid_value("metadata.annotations", key, problem))
    for i, ref in enumerate(md.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(field):
                causes.append(meta.required(f"metadata.ownerReferences[{i}].{field}"))
    return causes


def admit(res: Resource, obj: JSON, current: JSON | None) -> list[JSON]:
    """Resource-specific defaulting and validation for a create (``current`` None)
    or an update; returns field causes."""
    if res.name == "pods":
        if current is None:
            if not isinstance(obj.get("spec"), dict):
                return [meta.required("spec")]
            try:  # the apiserver defaults before it validates
                podspec.apply_defaults(obj)
                return podspec.validate_pod(obj)
            except (TypeError, AttributeError, KeyError, ValueError) as exc:
                raise bad_request(
                    f'Pod in version "v1" cannot be handled as a Pod: {exc!r}'
                ) from exc
        obj["status"] = current["status"]
        return _pod_update_causes(current["spec"], obj.get("spec"))
    if res.name in ("secrets", "configmaps"):
        return _normalize_data(res.name, obj, current)
    if res.name == "namespaces":
        base = namespace_object(obj["metadata"]["name"])
        obj.setdefault("spec", base["spec"])
        obj["status"] = current["status"] if current else base["status"]
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"][
            "name"
        ]
    if res.name == "persistentvolumeclaims":
        return _claim(obj, current)
    if res.name == "events" and current is None:
        obj.setdefault("count", 1)
    return []


def _claim(obj: JSON, current: JSON | None) -> list[JSON]:
    """A PersistentVolumeClaim: accessModes and a storage request required; bound at once
    (the double's dynamic provisioner: the kubelet backs it with a docker volume). Its
    spec is immutable but for a larger request."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [meta.required("spec")]
    causes = []
    if not spec.get("accessModes"):
        causes.append(meta.required("spec.accessModes"))
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        causes.append(meta.required("spec.resources[storage]"))
    if current is None:
        spec.setdefault("volumeMode", "Filesystem")
        obj["status"] = {
            "phase": "Bound",
            "accessModes": list(spec.get("accessModes") or []),
            "capacity": {"storage": spec["resources"]["requests"]["storage"]} if not causes else {},
        }
        return causes
    obj["status"] = current["status"]
    old = {k: v for k, v in current["spec"].items() if k != "resources"}
    new = {k: v for k, v in spec.items() if k != "resources"}
    if old != new:
        causes.append(
            meta.forbidden_field(
                "spec", "spec is immutable after creation except resources.requests"
            )
        )
    return causes


def _pod_update_causes(old: JSON, new: Any) -> list[JSON]:
    """Pod specs are immutable but for a few fields; image updates are not emulated."""
    if not isinstance(new, dict):
        return [meta.required("spec")]
    relaxed_old, relaxed_new = copy.deepcopy(old), copy.deepcopy(new)
    for spec in (relaxed_old, relaxed_new):
        spec.pop("activeDeadlineSeconds", None)
        spec.pop("tolerations", None)
    if relaxed_old == relaxed_new:
        return []
    return [
        meta.forbidden_field(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`, "
            "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
            "`spec.tolerations` (only additions to existing tolerations) "
            "(the k8s double does not emulate image updates either)",
        )
    ]


def _normalize_data(resource: str, obj: JSON, current: JSON | None) -> list[JSON]:
    """Secret/ConfigMap data: stringData folded into data, base64 checked, keys validated."""
    causes: list[JSON] = []
    if resource == "secrets":
        data = dict(obj.get("data") or {})
        for key, value in data.items():
            try:
                data[key] = base64.b64encode(base64.b64decode(str(value), validate=True)).decode()
            except (binascii.Error, ValueError) as exc:
                raise bad_request(
                    'Secret in version "v1" cannot be handled as a Secret: '
                    f"illegal base64 data for key {key}: {exc}"
                ) from exc
        for key, value in (obj.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data
        obj.setdefault("type", "Opaque")
        keys = list(data)
    else:
        keys = list(obj.get("data") or {}) + list(obj.get("binaryData") or {})
    for key in keys:
        if problem := meta.config_key_problem(key):
            causes.append(meta.invalid_value(f"data[{key}]", key, problem))
    if current is not None and current.get("immutable"):
        for field in ("data", "binaryData", "stringData", "immutable"):
            if obj.get(field) != current.get(field):
                causes.append(
                    meta.forbidden_field(field, "field is immutable when `immutable` is set")
                )
    return causes


def discovery() -> JSON:
    """``GET /api/v1``: the APIResourceList of what the double serves."""
    resources = []
    for res in RESOURCES.values():
        entry = {
            "name": res.name,
            "singularName": res.kind.lower(),
            "namespaced": res.namespaced,
            "kind": res.kind,
            "verbs": list(res.verbs),
        }
        if res.short_names:
            entry["shortNames"] = list(res.short_names)
        resources.append(entry)
    for sub, kind, verbs in (
        ("pods/exec", "PodExecOptions", ["create", "get"]),
        ("pods/log", "Pod", ["get"]),
        ("pods/portforward", "PodPortForwardOptions", ["create", "get"]),
        ("pods/status", "Pod", ["get"]),
        ("namespaces/status", "Namespace", ["get"]),
    ):
        resources.append(
            {
                "name": sub,
                "singularName": "",
                "namespaced": sub.startswith("pods"),
                "kind": kind,
                "verbs": verbs,
            }
        )
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}

"""Pure builders of the Kubernetes objects a kernel needs: its pod and its connection Secret.

Nothing here does I/O. Every builder copies its inputs and returns plain JSON-able dicts,
so the objects can be compared with literal dicts in tests, validated against the
Kubernetes OpenAPI schema, and sent to the API server as they are.

The kernel's connection file travels in a Secret mounted (mode 0400) only into an init
container, which copies it into a memory ``emptyDir`` as a 0600 file of the kernel's user:
ipykernel rewrites its connection file at start and fails on a read-only one. The HMAC
key is therefore never in the pod's env, command, labels or annotations.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..usernames import expand_username

MANAGED_BY = "cluster-provisioners"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT_KERNEL = "kernel"
PREFIX = "cluster-provisioners"
LABEL_KERNEL_ID = f"{PREFIX}/kernel-id"
LABEL_OWNER = f"{PREFIX}/owner"
LABEL_USERNAME = f"{PREFIX}/username"
#: On a warm (pool) kernel's pod and Secret until it is claimed: its ``pool-...`` id.
LABEL_POOL = f"{PREFIX}/pool"
ANNOTATION_KERNEL_ID = f"{PREFIX}/kernel-id"
ANNOTATION_OWNER = f"{PREFIX}/owner"
ANNOTATION_PORTS = f"{PREFIX}/ports"
ANNOTATION_KERNELSPEC = f"{PREFIX}/kernelspec"
ANNOTATION_USERNAME = f"{PREFIX}/username"
#: The kernel's launch parameters that differ from its kernelspec's defaults (JSON of
#: KERNEL_<NAME> values): the adopting server restarts the kernel with them.
ANNOTATION_LAUNCH_ENV = f"{PREFIX}/launch-env"
#: ``namespace/name/uid`` of the server pod that started the kernel (see ServerPod).
ANNOTATION_OWNER_POD = f"{PREFIX}/owner-pod"
#: The installation (the chart's ``<namespace>.<release>``) whose server started the kernel.
LABEL_RELEASE = f"{PREFIX}/release"
#: On the pod and Secret of a kernel started with ``persist_kernels`` (value ``"true"``): it
#: outlives its server, and the next server of its installation adopts it.
LABEL_PERSIST = f"{PREFIX}/persist"
#: Seconds a persisted kernel whose server stopped or died waits for adoption before an
#: orphan sweep removes it (the starting server's ``adoption_grace``, kept on the record so
#: that a sweep without that server's settings reads it).
ANNOTATION_ADOPTION_GRACE = f"{PREFIX}/adoption-grace"
#: Selects every kernel pod and Secret this package created.
KERNEL_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT_KERNEL}"

KERNEL_CONTAINER = "kernel"
INIT_CONTAINER = "connection-file"
SECRET_VOLUME = "connection-secret"
RUNTIME_VOLUME = "kernel-runtime"
SECRET_MOUNT = "/run/jupyter-kernel-secret"
RUNTIME_MOUNT = "/run/jupyter-kernel"
CONNECTION_KEY = "connection.json"
#: Path of the connection file as the kernel sees it (writable, 0600, its own user's).
CONNECTION_FILE = f"{RUNTIME_MOUNT}/{CONNECTION_KEY}"
SECRET_MODE = 0o400
#: Container port names, in jupyter_client's order (shell, iopub, stdin, hb, control).
PORT_LABELS = ("shell", "iopub", "stdin", "hb", "control")
GPU_RESOURCE = "nvidia.com/gpu"
HOSTNAME_LABEL = "kubernetes.io/hostname"
#: The pod volume (and the label's component) of a user's own claim (``user_volume_*``).
USER_VOLUME = "user-volume"
COMPONENT_USER_VOLUME = "user-volume"
#: Keys whose values are paths (``{username}`` a path segment there, a DNS label elsewhere).
VOLUME_PATH_KEYS = ("path",)
MOUNT_PATH_KEYS = ("mountPath", "subPath", "subPathExpr")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
_MAX_LABEL = 63


@dataclass(frozen=True)
class Resources:
    """CPU, memory and GPU requests/limits of the kernel container (quantity strings)."""

    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    gpus: int = 0
    gpu_resource: str = GPU_RESOURCE


@dataclass(frozen=True)
class Security:
    """The pod's and containers' security settings (non-root by default)."""

    run_as_user: int | None = 1000
    run_as_group: int | None = 1000
    fs_group: int | None = 1000
    run_as_non_root: bool = True
    seccomp_profile: str = "RuntimeDefault"


@dataclass(frozen=True)
class Scheduling:
    """Where the pod may run."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    affinity: Mapping[str, Any] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str = ""
    host_network: bool = False
    node_name: str = ""


@dataclass(frozen=True)
class KernelPod:
    """Everything the pod manifest is built from."""

    name: str
    namespace: str
    image: str
    command: tuple[str, ...]
    ports: tuple[int, int, int, int, int]
    kernel_id: str
    secret_name: str
    owner: str = ""
    username: str = ""
    kernelspec: str = ""
    #: ``namespace/name/uid`` of the server's pod ('' outside a pod).
    owner_pod: str = ""
    #: Make the server pod the kernel pod's owner (only when both share the namespace).
    owner_reference: bool = True
    release: str = ""
    #: A warm kernel's ``pool-...`` id ('' for any other kernel): the :data:`LABEL_POOL` label.
    pool: str = ""
    #: Started with ``persist_kernels``: the :data:`LABEL_PERSIST` label, the adoption grace
    #: annotation, and no ownerReference to the server pod (the kernel outlives it).
    persist: bool = False
    #: Seconds the kernel waits for adoption once its server is gone (with ``persist``).
    adoption_grace: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    security: Security = field(default_factory=Security)
    scheduling: Scheduling = field(default_factory=Scheduling)
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    service_account_name: str = ""
    automount_service_account_token: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    grace_period: int = 5
    template: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UserVolume:
    """A user's own PersistentVolumeClaim, mounted into each of the user's kernels."""

    claim: str
    mount_path: str
    size: str = "1Gi"
    storage_class: str = ""
    username: str = ""


# ---------------------------------------------------------------------- per user


def user_volumes(
    volumes: Iterable[Mapping[str, Any]], volume_mounts: Iterable[Mapping[str, Any]], username: str
) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """``volumes`` and ``volume_mounts`` with ``{username}`` expanded: a DNS label in names
    (a volume's, a ``claimName``), a path segment in paths (``path``, ``mountPath``,
    ``subPath``). Raises :class:`~provisioners.usernames.UsernameError` naming the setting
    when one uses ``{username}`` and ``username`` is empty."""
    vols = expand_username(
        [dict(v) for v in volumes], username, "dns", setting="volumes", path_keys=VOLUME_PATH_KEYS
    )
    mounts = expand_username(
        [dict(v) for v in volume_mounts],
        username,
        "dns",
        setting="volume_mounts",
        path_keys=MOUNT_PATH_KEYS,
    )
    return tuple(vols), tuple(mounts)


def user_namespace(namespace: str, username: str) -> str:
    """``namespace`` with ``{username}`` as a DNS label; raises
    :class:`~provisioners.usernames.UsernameError` without a user, ``ValueError`` when
    the result is no DNS-1123 label."""
    name = expand_username(namespace, username, "dns", setting="namespace")
    if not is_dns_label(name):
        raise ValueError(f"namespace {name!r} is not a DNS-1123 label")
    return str(name)


def user_volume(
    claim: str, mount_path: str, size: str, storage_class: str, username: str
) -> UserVolume | None:
    """The user's claim (``claim`` with ``{username}`` as a DNS label), or None when
    ``mount_path`` is empty (no volume per user). Raises
    :class:`~provisioners.usernames.UsernameError` without a user, ``ValueError`` when the
    claim's name is not a DNS-1123 label."""
    if not mount_path:
        return None
    name = expand_username(claim, username, "dns", setting="user_volume_claim")
    if not is_dns_label(name):
        raise ValueError(f"user_volume_claim {name!r} is not a DNS-1123 label")
    path = expand_username(mount_path, username, "path", setting="user_volume_mount_path")
    return UserVolume(name, path, size, storage_class, username)


def with_user_volume(
    volumes: tuple[Mapping[str, Any], ...],
    volume_mounts: tuple[Mapping[str, Any], ...],
    volume: UserVolume | None,
) -> tuple[tuple[Mapping[str, Any], ...], tuple[Mapping[str, Any], ...]]:
    """``volumes`` and ``volume_mounts`` plus the user's claim and its mount."""
    if volume is None:
        return volumes, volume_mounts
    claim = {"name": USER_VOLUME, "persistentVolumeClaim": {"claimName": volume.claim}}
    mount = {"name": USER_VOLUME, "mountPath": volume.mount_path}
    return (*volumes, claim), (*volume_mounts, mount)


def claim_manifest(volume: UserVolume, namespace: str, release: str = "") -> dict[str, Any]:
    """The user's PersistentVolumeClaim (ReadWriteOnce). It is labelled as ours but never
    as a kernel's: no sweep, cleanup or kernel removal deletes a user's data."""
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_USER_VOLUME}
    annotations = {}
    if volume.username:
        labels[LABEL_USERNAME] = sanitize_label_value(volume.username)
        annotations[ANNOTATION_USERNAME] = volume.username
    if release:
        labels[LABEL_RELEASE] = sanitize_label_value(release)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class:
        spec["storageClassName"] = volume.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": volume.claim,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


# ---------------------------------------------------------------------- names and labels


def pod_name(prefix: str, token: str) -> str:
    """``<prefix>-<token>``, checked to be a DNS-1123 label (e.g. ``kernel-<uuid hex>``).

    Both parts come from the provisioner (a validated prefix, a fresh uuid hex), never
    from user input.
    """
    name = f"{prefix}-{token}".lower()
    if len(name) > _MAX_LABEL or not _DNS_LABEL.match(name):
        msg = f"{name!r} is not a DNS-1123 label"
        raise ValueError(msg)
    return name


def secret_name_for(pod: str) -> str:
    """Name of the connection Secret of pod ``pod``."""
    return f"{pod}-connection"


def is_dns_label(text: str) -> bool:
    """True when ``text`` is a DNS-1123 label (lowercase alphanumerics and '-', <= 63)."""
    return len(text) <= _MAX_LABEL and bool(_DNS_LABEL.match(text))


def sanitize_label_value(text: str) -> str:
    """``text`` made a valid label value; altered values get a short hash of the original.

    Label values are at most 63 characters of ``[A-Za-z0-9._-]``, starting and ending
    alphanumeric. A value already valid is returned unchanged.
    """
    text = str(text)
    clean = _LABEL_VALUE_BAD.sub("-", text).strip("-_.")
    if clean == text and len(clean) <= _MAX_LABEL:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    stem = clean[: _MAX_LABEL - len(digest) - 1].strip("-_.")
    return f"{stem}-{digest}" if stem else digest


def kernel_labels(
    kernel_id: str, owner: str = "", username: str = "", pool: str = ""
) -> dict[str, str]:
    """The labels every kernel pod and Secret carries (values sanitized); ``pool`` is a
    warm kernel's pool id (:data:`LABEL_POOL`, removed when the kernel is claimed)."""
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: COMPONENT_KERNEL,
        LABEL_KERNEL_ID: sanitize_label_value(kernel_id),
    }
    if owner:
        labels[LABEL_OWNER] = sanitize_label_value(owner)
    if username:
        labels[LABEL_USERNAME] = sanitize_label_value(username)
    if pool:
        labels[LABEL_POOL] = sanitize_label_value(pool)
    return labels


def claim_patch(kernel_id: str, username: str = "") -> dict[str, Any]:
    """The merge patch (RFC 7386) that gives a claimed warm kernel's pod or Secret the
    kernel id it now serves: kernel-id label and annotation, no pool label; with
    ``username``, the user's label and annotation."""
    labels: dict[str, Any] = {LABEL_KERNEL_ID: sanitize_label_value(kernel_id), LABEL_POOL: None}
    annotations = {ANNOTATION_KERNEL_ID: str(kernel_id)}
    if username:
        labels[LABEL_USERNAME] = sanitize_label_value(username)
        annotations[ANNOTATION_USERNAME] = str(username)
    return {"metadata": {"labels": labels, "annotations": annotations}}


def persist_metadata(
    persist: bool, adoption_grace: float | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations that mark a kernel started with ``persist_kernels``
    (both empty when ``persist`` is off)."""
    if not persist:
        return {}, {}
    annotations = {}
    if adoption_grace is not None:
        annotations[ANNOTATION_ADOPTION_GRACE] = f"{float(adoption_grace):g}"
    return {LABEL_PERSIST: "true"}, annotations


def is_persisted(meta: Mapping[str, Any]) -> bool:
    """True when the object with metadata ``meta`` is a kernel started with
    ``persist_kernels`` and is not an unclaimed warm kernel (those never wait for adoption)."""
    labels = meta.get("labels") or {}
    return labels.get(LABEL_PERSIST) == "true" and LABEL_POOL not in labels


def adoption_grace_of(meta: Mapping[str, Any], default: float) -> float:
    """The adoption grace recorded on the object with metadata ``meta`` (``default`` when
    absent or not a non-negative number)."""
    text = (meta.get("annotations") or {}).get(ANNOTATION_ADOPTION_GRACE, "")
    try:
        grace = float(text)
    except ValueError:
        return default
    return grace if math.isfinite(grace) and grace >= 0 else default


def owner_patch(
    owner: str, owner_pod: str = "", *, drop_owner_references: bool = False
) -> dict[str, Any]:
    """The merge patch (RFC 7386) that makes ``owner`` a kernel pod's or Secret's owner
    record: owner label and annotation, and owner-pod annotation (removed when
    ``owner_pod`` is ''). A detach writes a detached mark as both; an adoption writes the
    adopting server. ``drop_owner_references`` also removes the pod's ownerReferences
    (a kernel pod's only one is its server pod, which the kernel now outlives)."""
    meta: dict[str, Any] = {
        "labels": {LABEL_OWNER: sanitize_label_value(owner)},
        "annotations": {ANNOTATION_OWNER: str(owner), ANNOTATION_OWNER_POD: owner_pod or None},
    }
    if drop_owner_references:
        meta["ownerReferences"] = None
    return {"metadata": meta}


def kernel_annotations(
    kernel_id: str,
    owner: str = "",
    ports: Iterable[int] = (),
    kernelspec: str = "",
    username: str = "",
    owner_pod: str = "",
) -> dict[str, str]:
    """Exact values (which labels can only carry sanitized): kernel id, owner, ports..."""
    annotations = {ANNOTATION_KERNEL_ID: str(kernel_id)}
    if owner:
        annotations[ANNOTATION_OWNER] = str(owner)
    if owner_pod:
        annotations[ANNOTATION_OWNER_POD] = str(owner_pod)
    ports = [int(p) for p in ports]
    if ports:
        annotations[ANNOTATION_PORTS] = json.dumps(ports)
    if kernelspec:
        annotations[ANNOTATION_KERNELSPEC] = str(kernelspec)
    if username:
        annotations[ANNOTATION_USERNAME] = str(username)
    return annotations


def ports_from_annotations(meta: Mapping[str, Any]) -> list[int]:
    """The kernel ports recorded in an object's metadata (empty when absent or invalid)."""
    text = (meta.get("annotations") or {}).get(ANNOTATION_PORTS, "")
    try:
        ports = json.loads(text) if text else []
    except ValueError:
        return []
    if not isinstance(ports, list):
        return []
    return [p for p in ports if isinstance(p, int) and 0 < p < 65536]


def is_quantity(text: str) -> bool:
    """True when ``text`` is a Kubernetes resource quantity such as '500m', '2Gi', '1.5'."""
    return bool(_QUANTITY.match(str(text)))


# ---------------------------------------------------------------------- merging and templates


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``.

    Mappings merge key by key; lists whose items are all mappings with a ``name`` merge
    item by item on the name (containers, env, volumes, volumeMounts...); any other value
    of ``override`` replaces the one of ``base``. A ``None`` in ``override`` removes the key.
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        elif _named_list(value) and _named_list(out.get(key)):
            out[key] = _merge_named(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _named_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, Mapping) and "name" in v for v in value)
    )


def _merge_named(base: list[Mapping[str, Any]], override: list[Mapping[str, Any]]) -> list[Any]:
    merged = [copy.deepcopy(dict(item)) for item in base]
    index = {item["name"]: i for i, item in enumerate(merged)}
    for item in override:
        if item["name"] in index:
            merged[index[item["name"]]] = deep_merge(merged[index[item["name"]]], item)
        else:
            index[item["name"]] = len(merged)
            merged.append(copy.deepcopy(dict(item)))
    return merged


def parse_pod_template(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A user pod template given as a YAML/JSON string or a mapping, as a dict.

    Raises ``ValueError`` when it is not a mapping (a Pod, or just its fields).
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            msg = f"not valid YAML: {exc}"
            raise ValueError(msg) from exc
        if value is None:
            return {}
    if not isinstance(value, Mapping):
        msg = f"must be a mapping (a Pod manifest), not {type(value).__name__}"
        raise ValueError(msg)
    return copy.deepcopy(dict(value))


# ---------------------------------------------------------------------- builders


def resource_requirements(res: Resources) -> dict[str, dict[str, str]]:
    """The container's ``resources`` (GPUs as limits of ``res.gpu_resource``)."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu_request:
        requests["cpu"] = str(res.cpu_request)
    if res.memory_request:
        requests["memory"] = str(res.memory_request)
    if res.cpu_limit:
        limits["cpu"] = str(res.cpu_limit)
    if res.memory_limit:
        limits["memory"] = str(res.memory_limit)
    if res.gpus:
        limits[res.gpu_resource] = str(int(res.gpus))
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_security_context(sec: Security) -> dict[str, Any]:
    """The pod-level ``securityContext``."""
    ctx: dict[str, Any] = {"runAsNonRoot": sec.run_as_non_root}
    if sec.run_as_user is not None:
        ctx["runAsUser"] = sec.run_as_user
    if sec.run_as_group is not None:
        ctx["runAsGroup"] = sec.run_as_group
    if sec.fs_group is not None:
        ctx["fsGroup"] = sec.fs_group
    if sec.seccomp_profile:
        ctx["seccompProfile"] = {"type": sec.seccomp_profile}
    return ctx


def container_security_context(sec: Security) -> dict[str, Any]:
    """A container's ``securityContext``: no privilege escalation, every capability dropped."""
    ctx: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": sec.run_as_non_root,
    }
    if sec.run_as_user is not None:
        ctx["runAsUser"] = sec.run_as_user
    return ctx


def init_container(spec: KernelPod) -> dict[str, Any]:
    """Copies the connection file from the Secret into the writable memory volume (0600)."""
    src = f"{SECRET_MOUNT}/{CONNECTION_KEY}"
    return {
        "name": INIT_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["install", "-m", "0600", src, CONNECTION_FILE],
        "resources": resource_requirements(spec.resources),
        "securityContext": container_security_context(spec.security),
        "volumeMounts": [
            {"name": SECRET_VOLUME, "mountPath": SECRET_MOUNT, "readOnly": True},
            {"name": RUNTIME_VOLUME, "mountPath": RUNTIME_MOUNT},
        ],
    }


def kernel_container(spec: KernelPod) -> dict[str, Any]:
    """The kernel container: the kernelspec's command, its env, ports and mounts."""
    container: dict[str, Any] = {
        "name": KERNEL_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": list(spec.command),
        # '$' doubled: the kubelet expands $(NAME) in values and reads '$$' as '$'
        "env": [{"name": str(k), "value": str(v).replace("$", "$$")} for k, v in spec.env.items()],
        "ports": [
            {"name": name, "containerPort": int(port), "protocol": "TCP"}
            for name, port in zip(PORT_LABELS, spec.ports, strict=True)
        ],
        "resources": resource_requirements(spec.resources),
        "securityContext": container_security_context(spec.security),
        "volumeMounts": [{"name": RUNTIME_VOLUME, "mountPath": RUNTIME_MOUNT}]
        + [copy.deepcopy(dict(m)) for m in spec.volume_mounts],
    }
    if spec.working_dir:
        container["workingDir"] = spec.working_dir
    return container


def connection_volumes(secret_name: str) -> list[dict[str, Any]]:
    """The Secret volume (0400, init container only) and the memory volume of the kernel."""
    return [
        {"name": SECRET_VOLUME, "secret": {"secretName": secret_name, "defaultMode": SECRET_MODE}},
        {"name": RUNTIME_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]


def pod_manifest(spec: KernelPod) -> dict[str, Any]:
    """The kernel's Pod.

    The user template is merged over the built pod (it may change or add anything), then
    what the provisioner relies on is restored: name, namespace, our labels and
    annotations, the connection volumes, the init container and the kernel's command and
    runtime mount.
    """
    labels = {**{k: sanitize_label_value(v) for k, v in spec.labels.items()}}
    labels.update(kernel_labels(spec.kernel_id, spec.owner, spec.username, spec.pool))
    if spec.release:
        labels[LABEL_RELEASE] = sanitize_label_value(spec.release)
    persist_labels, persist_annotations = persist_metadata(spec.persist, spec.adoption_grace)
    labels.update(persist_labels)
    annotations = {str(k): str(v) for k, v in spec.annotations.items()}
    annotations.update(
        kernel_annotations(
            spec.kernel_id, spec.owner, spec.ports, spec.kernelspec, spec.username, spec.owner_pod
        )
    )
    annotations.update(persist_annotations)
    sched = spec.scheduling
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": spec.automount_service_account_token,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": int(spec.grace_period),
        "securityContext": pod_security_context(spec.security),
        "initContainers": [init_container(spec)],
        "containers": [kernel_container(spec)],
        "volumes": connection_volumes(spec.secret_name)
        + [copy.deepcopy(dict(v)) for v in spec.volumes],
    }
    node_selector = {str(k): str(v) for k, v in sched.node_selector.items()}
    if sched.node_name:
        node_selector[HOSTNAME_LABEL] = sched.node_name
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if sched.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(sched.affinity))
    if sched.tolerations:
        pod_spec["tolerations"] = [copy.deepcopy(dict(t)) for t in sched.tolerations]
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": pod_spec,
    }
    # a persisted kernel outlives its server pod: the collector must not delete it with it
    owned = spec.owner_reference and not spec.persist
    server = server_pod_reference(spec.owner_pod, spec.namespace) if owned else None
    if server is not None:
        pod["metadata"]["ownerReferences"] = [server]
    if spec.template:
        pod = _apply_template(pod, spec)
    return pod


def _apply_template(pod: dict[str, Any], spec: KernelPod) -> dict[str, Any]:
    template = {k: v for k, v in spec.template.items() if k not in ("apiVersion", "kind")}
    merged = deep_merge(pod, template)
    meta = merged.setdefault("metadata", {})
    meta["name"], meta["namespace"] = spec.name, spec.namespace
    meta["labels"] = {
        **{k: sanitize_label_value(v) for k, v in (meta.get("labels") or {}).items()},
        **pod["metadata"]["labels"],
    }
    meta["annotations"] = {**(meta.get("annotations") or {}), **pod["metadata"]["annotations"]}
    pspec = merged.setdefault("spec", {})
    ours = {v["name"] for v in pod["spec"]["volumes"][:2]}
    pspec["volumes"] = pod["spec"]["volumes"][:2] + [
        v for v in pspec.get("volumes") or [] if v.get("name") not in ours
    ]
    pspec["initContainers"] = [init_container(spec)] + [
        c for c in pspec.get("initContainers") or [] if c.get("name") != INIT_CONTAINER
    ]
    for container in pspec.get("containers") or []:
        if container.get("name") == KERNEL_CONTAINER:
            container["command"] = list(spec.command)
            mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") not in ours]
            container["volumeMounts"] = [{"name": RUNTIME_VOLUME, "mountPath": RUNTIME_MOUNT}]
            container["volumeMounts"] += mounts
    return merged


def server_pod_reference(owner_pod: str, namespace: str) -> dict[str, Any] | None:
    """An ownerReference to the server pod ``namespace/name/uid``, or None when it is not in
    ``namespace``: the garbage collector treats an owner in another namespace as absent and
    would delete the kernel pod at once."""
    parts = owner_pod.split("/")
    if len(parts) != 3 or not all(parts) or parts[0] != namespace:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": parts[1], "uid": parts[2]}


def owner_reference(pod: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to ``pod`` (as returned by the API: it needs its uid)."""
    meta = pod["metadata"]
    return {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}


def secret_manifest(
    name: str,
    namespace: str,
    connection: bytes,
    labels: Mapping[str, str],
    owner_pod: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Secret holding the connection file; owned by ``owner_pod`` when given."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner_pod is not None:
        meta["ownerReferences"] = [owner_reference(owner_pod)]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "immutable": True,
        "data": {CONNECTION_KEY: base64.b64encode(bytes(connection)).decode()},
    }


def ports_held_on_node(pods: Iterable[Mapping[str, Any]], node: str | None) -> set[int]:
    """Ports our hostNetwork pods hold on ``node`` (any node when ``node`` is None).

    A pod counts for a node once scheduled there, or while pinned to it by a
    ``kubernetes.io/hostname`` nodeSelector; finished pods hold nothing.
    """
    held: set[int] = set()
    for pod in pods:
        spec = pod.get("spec") or {}
        if not spec.get("hostNetwork"):
            continue
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        placed = spec.get("nodeName") or (spec.get("nodeSelector") or {}).get(HOSTNAME_LABEL)
        if node is None or placed == node or not placed:
            held.update(ports_from_annotations(pod.get("metadata") or {}))
    return held

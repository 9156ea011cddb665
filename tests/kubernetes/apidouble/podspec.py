"""Pod specs: apiserver defaulting and validation, and the kubelet's translation of a
container spec (env, command, user, resources, volumes) into docker arguments."""

from __future__ import annotations

import base64
import io
import re
import tarfile
import time
from decimal import Decimal
from typing import Any

from . import meta
from .meta import JSON

CONTAINER_FIELDS = ("initContainers", "containers")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_VOLUME_SOURCES = (
    "emptyDir",
    "secret",
    "configMap",
    "hostPath",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "nfs",
    "csi",
    "ephemeral",
)
SUPPORTED_VOLUMES = ("emptyDir", "secret", "configMap", "persistentVolumeClaim")


class ConfigError(Exception):
    """A container cannot be configured yet (CreateContainerConfigError)."""


# --- defaulting -------------------------------------------------------------------------


def default_pull_policy(image: str) -> str:
    """``Always`` for ``:latest`` or untagged images, else ``IfNotPresent``."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def apply_defaults(pod: JSON) -> None:
    """The defaults the apiserver fills into a new pod."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    for field in CONTAINER_FIELDS:
        for container in spec.get(field) or []:
            if not isinstance(container, dict):
                continue
            container.setdefault(
                "imagePullPolicy", default_pull_policy(container.get("image") or "")
            )
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            resources = container.setdefault("resources", {})
            limits = resources.get("limits") or {}
            if limits:
                requests = resources.setdefault("requests", {})
                for name, value in limits.items():
                    requests.setdefault(name, value)
            for port in container.get("ports") or []:
                port.setdefault("protocol", "TCP")
    for volume in spec.get("volumes") or []:
        for source in ("secret", "configMap"):
            if source in volume:
                volume[source].setdefault("defaultMode", 0o644)
    pod["status"] = {"phase": "Pending", "qosClass": qos_class(spec)}


def qos_class(spec: JSON) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for res in resources:
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        for name in ("cpu", "memory"):
            if name not in limits or requests.get(name, limits[name]) != limits[name]:
                return "Burstable"
    return "Guaranteed"


# --- validation -------------------------------------------------------------------------


def validate_pod(pod: JSON) -> list[JSON]:
    """Field causes for an invalid new pod (an empty list when it is valid)."""
    causes: list[JSON] = []
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [meta.required("spec")]
    volumes = {}
    for i, volume in enumerate(spec.get("volumes") or []):
        field = f"spec.volumes[{i}]"
        name = volume.get("name", "")
        problem = meta.label_name_problem(name) if name else None
        if not name:
            causes.append(meta.required(f"{field}.name"))
        elif problem:
            causes.append(meta.invalid_value(f"{field}.name", name, problem))
        elif name in volumes:
            causes.append(meta.duplicate(f"{field}.name", name))
        sources = [s for s in _VOLUME_SOURCES if s in volume]
        if len(sources) != 1:
            causes.append(
                meta.required(f"{field}")
                if not sources
                else meta.forbidden_field(
                    field, f"may not specify more than 1 volume type, got {sources}"
                )
            )
        if "secret" in volume and not volume["secret"].get("secretName"):
            causes.append(meta.required(f"{field}.secret.secretName"))
        if "configMap" in volume and not volume["configMap"].get("name"):
            causes.append(meta.required(f"{field}.configMap.name"))
        for source in ("secret", "configMap"):
            src = volume.get(source) or {}
            modes = [("defaultMode", src.get("defaultMode"))] + [
                (f"items[{j}].mode", item.get("mode"))
                for j, item in enumerate(src.get("items") or [])
            ]
            for sub, mode in modes:
                if mode is not None and not (0 <= int(mode) <= 0o777):
                    causes.append(
                        meta.invalid_value(
                            f"{field}.{source}.{sub}",
                            mode,
                            "must be a number between 0 and 0777 (octal), both inclusive",
                        )
                    )
            for j, item in enumerate(src.get("items") or []):
                path = item.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    causes.append(
                        meta.invalid_value(
                            f"{field}.{source}.items[{j}].path",
                            path,
                            "must be a relative path without '..'",
                        )
                    )
        volumes[name] = volume
    names: set[str] = set()
    if not spec.get("containers"):
        causes.append(meta.required("spec.containers"))
    for field in CONTAINER_FIELDS:
        for i, container in enumerate(spec.get(field) or []):
            causes += _validate_container(container, f"spec.{field}[{i}]", names, volumes)
    policy = spec.get("restartPolicy")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(
            meta.not_supported("spec.restartPolicy", policy, ("Always", "Never", "OnFailure"))
        )
    causes += meta.validate_labels(spec.get("nodeSelector"), "spec.nodeSelector")
    for field in ("runAsUser", "runAsGroup", "fsGroup"):
        value = (spec.get("securityContext") or {}).get(field)
        if value is not None and (not isinstance(value, int) or value < 0):
            causes.append(
                meta.invalid_value(
                    f"spec.securityContext.{field}",
                    value,
                    "must be between 0 and 2147483647, inclusive",
                )
            )
    return causes


def _validate_container(
    container: JSON, field: str, names: set[str], volumes: dict[str, Any]
) -> list[JSON]:
    causes = []
    name = container.get("name", "")
    if not name:
        causes.append(meta.required(f"{field}.name"))
    elif problem := meta.label_name_problem(name):
        causes.append(meta.invalid_value(f"{field}.name", name, problem))
    elif name in names:
        causes.append(meta.duplicate(f"{field}.name", name))
    names.add(name)
    if not container.get("image"):
        causes.append(meta.required(f"{field}.image"))
    for j, env in enumerate(container.get("env") or []):
        env_name = env.get("name", "")
        if not _ENV_NAME.match(env_name):
            causes.append(
                meta.invalid_value(
                    f"{field}.env[{j}].name",
                    env_name,
                    "a valid environment variable name must consist of "
                    "alphabetic characters, digits, '_', '-', or '.', and "
                    "must not start with a digit",
                )
            )
    for j, port in enumerate(container.get("ports") or []):
        number = port.get("containerPort")
        if not isinstance(number, int) or not 0 < number < 65536:
            causes.append(
                meta.invalid_value(
                    f"{field}.ports[{j}].containerPort",
                    number,
                    "must be between 1 and 65535, inclusive",
                )
            )
    paths: set[str] = set()
    for j, mount in enumerate(container.get("volumeMounts") or []):
        if mount.get("name") not in volumes:
            causes.append(
                meta.field_not_found(f"{field}.volumeMounts[{j}].name", mount.get("name", ""))
            )
        path = mount.get("mountPath", "")
        if not path:
            causes.append(meta.required(f"{field}.volumeMounts[{j}].mountPath"))
        elif path in paths:
            causes.append(
                meta.invalid_value(f"{field}.volumeMounts[{j}].mountPath", path, "must be unique")
            )
        paths.add(path)
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        for res_name, value in (resources.get(kind) or {}).items():
            try:
                meta.parse_quantity(value)
            except ValueError:
                causes.append(
                    meta.invalid_value(
                        f"{field}.resources.{kind}[{res_name}]",
                        str(value),
                        "must match the regex ^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$",
                    )
                )
                return causes
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for res_name, value in requests.items():
        if res_name in limits and meta.parse_quantity(value) > meta.parse_quantity(
            limits[res_name]
        ):
            causes.append(
                meta.invalid_value(
                    f"{field}.resources.requests",
                    str(value),
                    f"must be less than or equal to {res_name} limit of {limits[res_name]}",
                )
            )
        if "/" in res_name and res_name not in limits:
            causes.append(
                meta.forbidden_field(
                    f"{field}.resources.limits",
                    f"Limit must be set for non overcommitable resources: {res_name}",
                )
            )
    return causes


# --- volumes ----------------------------------------------------------------------------


def volume_archive(volume: JSON, source: JSON | None, fs_group: int | None) -> bytes:
    """The files of a secret/configMap volume as a tar for the volume's root, laid out
    like the kubelet's atomic writer: ``..<timestamp>/`` with the files, ``..data`` link
    to it and a link per top-level name. ``source`` None means an optional, absent object.
    Raises ConfigError when an item references a missing key."""
    kind = "secret" if "secret" in volume else "configMap"
    src = volume[kind]
    payload: dict[str, bytes] = {}
    if source is not None:
        for key, value in (source.get("data") or {}).items():
            payload[key] = base64.b64decode(value) if kind == "secret" else str(value).encode()
        for key, value in (source.get("binaryData") or {}).items():
            payload[key] = base64.b64decode(value)
    default_mode = int(src.get("defaultMode", 0o644))
    files: list[tuple[str, bytes, int]] = []
    if src.get("items"):
        for item in src["items"]:
            if item["key"] not in payload:
                if src.get("optional"):
                    continue
                label = "secret" if kind == "secret" else "configmap"
                raise ConfigError(f"references non-existent {label} key: {item['key']}")
            files.append((item["path"], payload[item["key"]], int(item.get("mode", default_mode))))
    else:
        files = [(key, value, default_mode) for key, value in sorted(payload.items())]
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
    now = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {stamp}
        for path, _data, _mode in files:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                dirs.add(stamp + "/" + "/".join(parts[:depth]))
        for directory in sorted(dirs):
            info = tarfile.TarInfo(directory)
            info.type, info.mtime = tarfile.DIRTYPE, now
            info.mode = 0o755 if fs_group is None else 0o2755 | 0o550
            info.gid = fs_group or 0
            tar.addfile(info)
        for path, data, mode in files:
            info = tarfile.TarInfo(f"{stamp}/{path}")
            info.size, info.mtime = len(data), now
            info.mode = mode if fs_group is None else mode | 0o440
            info.gid = fs_group or 0
            tar.addfile(info, io.BytesIO(data))
        links = {"..data": stamp}
        for path, _data, _mode in files:
            top = path.split("/")[0]
            links[top] = f"..data/{top}"
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, now
            info.gid = fs_group or 0
            tar.addfile(info)
    return buf.getvalue()


# --- containers -------------------------------------------------------------------------


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, unknown ones kept,
    ``$$`` escapes a ``$``."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def field_ref(pod: JSON, path: str) -> str:
    """A downward-API ``fieldRef.fieldPath`` value."""
    md, status = pod["metadata"], pod.get("status") or {}
    match = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if match:
        return (md.get(match.group(1)) or {}).get(match.group(2), "")
    values = {
        "metadata.name": md.get("name", ""),
        "metadata.namespace": md.get("namespace", ""),
        "metadata.uid": md.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path not in values:
        raise ConfigError(f"unsupported fieldPath: {path}")
    return values[path]


def resource_ref(container: JSON, ref: JSON) -> str:
    kind, _, name = ref.get("resource", "").partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if value is None:
        return "0"
    divisor = meta.parse_quantity(ref.get("divisor", "1"))
    return str(
        int((meta.parse_quantity(value) / divisor).to_integral_value(rounding="ROUND_CEILING"))
    )


def build_env(pod: JSON, container: JSON, lookup: Any) -> dict[str, str]:
    """The container's environment. ``lookup(kind, name)`` returns a Secret/ConfigMap
    object or None. Raises ConfigError like the kubelet's CreateContainerConfigError."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}

    def source_values(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = lookup(kind, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(
                f'{"secret" if kind == "secrets" else "configmap"} "{name}" not found'
            )
        if kind == "secrets":
            return {
                k: base64.b64decode(v).decode(errors="replace")
                for k, v in (obj.get("data") or {}).items()
            }
        return dict(obj.get("data") or {})

    for source in container.get("envFrom") or []:
        kind = "secrets" if "secretRef" in source else "configmaps"
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        values = source_values(kind, ref.get("name", ""), bool(ref.get("optional")))
        for key, value in (values or {}).items():
            if _ENV_NAME.match(source.get("prefix", "") + key):
                env[source.get("prefix", "") + key] = value
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        value_from = item["valueFrom"]
        if "fieldRef" in value_from:
            env[name] = field_ref(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            env[name] = resource_ref(container, value_from["resourceFieldRef"])
        else:
            kind = "secrets" if "secretKeyRef" in value_from else "configmaps"
            ref = value_from.get("secretKeyRef") or value_from.get("configMapKeyRef") or {}
            values = source_values(kind, ref.get("name", ""), bool(ref.get("optional")))
            if values is None:
                continue
            if ref.get("key") not in values:
                if ref.get("optional"):
                    continue
                label = "Secret" if kind == "secrets" else "ConfigMap"
                raise ConfigError(
                    f"couldn't find key {ref.get('key')} in {label} {ns}/{ref.get('name')}"
                )
            env[name] = values[ref["key"]]
    return env


def effective_user(pod: JSON, container: JSON, image_user: str) -> tuple[str | None, list[str]]:
    """Docker ``user`` and ``group_add`` for the pod/container security contexts;
    ConfigError when runAsNonRoot cannot hold."""
    pod_sc, sc = pod["spec"].get("securityContext") or {}, container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    md = pod["metadata"]
    who = f'(pod: "{md["name"]}_{md["namespace"]}({md["uid"]})", container: {container["name"]})'
    image_uid = image_user.split(":", 1)[0] if image_user else "0"
    if non_root:
        if uid is None and not image_uid.isdigit():
            raise ConfigError(
                f"container has runAsNonRoot and image has non-numeric user ({image_uid}), "
                f"cannot verify user is non-root {who}"
            )
        if (uid if uid is not None else int(image_uid)) == 0:
            raise ConfigError(f"container has runAsNonRoot and image will run as root {who}")
    user = None
    if uid is not None or gid is not None:
        user = str(uid if uid is not None else image_uid)
        if gid is not None:
            user += f":{gid}"
    groups = [str(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        groups.append(str(pod_sc["fsGroup"]))
    return user, groups


def docker_limits(container: JSON) -> dict[str, Any]:
    """docker cpu/memory limits for ``resources.limits`` (requests only schedule)."""
    limits = (container.get("resources") or {}).get("limits") or {}
    out: dict[str, Any] = {}
    if "cpu" in limits:
        out["nano_cpus"] = int(meta.parse_quantity(limits["cpu"]) * Decimal(10**9))
    if "memory" in limits:
        out["mem_limit"] = max(int(meta.parse_quantity(limits["memory"])), 6 * 1024 * 1024)
    return out


def security_options(container: JSON) -> dict[str, Any]:
    sc = container.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    out: dict[str, Any] = {}
    if caps.get("add"):
        out["cap_add"] = list(caps["add"])
    if caps.get("drop"):
        out["cap_drop"] = list(caps["drop"])
    if sc.get("privileged"):
        out["privileged"] = True
    if sc.get("readOnlyRootFilesystem"):
        out["read_only"] = True
    if sc.get("allowPrivilegeEscalation") is False:
        out["security_opt"] = ["no-new-privileges"]
    return out


# --- scheduling ---------------------------------------------------------------------------


def pod_requests(spec: JSON) -> dict[str, Decimal]:
    """Effective requests: the larger of the sum over containers and each init container."""
    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        for name, value in ((container.get("resources") or {}).get("requests") or {}).items():
            total[name] = total.get(name, Decimal(0)) + meta.parse_quantity(value)
    for container in spec.get("initContainers") or []:
        for name, value in ((container.get("resources") or {}).get("requests") or {}).items():
            total[name] = max(total.get(name, Decimal(0)), meta.parse_quantity(value))
    return total


def _match_expression(labels: dict[str, str], expr: JSON) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator"), expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def node_matches(spec: JSON, node: JSON) -> bool:
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    fields = {"metadata.name": node["metadata"]["name"]}
    return any(
        all(_match_expression(labels, e) for e in term.get("matchExpressions") or [])
        and all(_match_expression(fields, e) for e in term.get("matchFields") or [])
        for term in terms
    )


def unschedulable_reason(pod: JSON, node: JSON, others: list[JSON]) -> str | None:
    """Why ``pod`` does not fit the node (kube-scheduler's message), or None."""
    spec = pod["spec"]
    if (node.get("spec") or {}).get("unschedulable"):
        reasons, hint = ["1 node(s) were unschedulable"], "Preemption is not helpful for scheduling"
    elif not node_matches(spec, node):
        reasons = ["1 node(s) didn't match Pod's node affinity/selector"]
        hint = "Preemption is not helpful for scheduling"
    else:
        allocatable = {k: meta.parse_quantity(v) for k, v in node["status"]["allocatable"].items()}
        used: dict[str, Decimal] = {"pods": Decimal(len(others))}
        for other in others:
            for name, value in pod_requests(other["spec"]).items():
                used[name] = used.get(name, Decimal(0)) + value
        wanted = {**pod_requests(spec), "pods": Decimal(1)}
        reasons = [
            "1 Too many pods" if name == "pods" else f"1 Insufficient {name}"
            for name, value in sorted(wanted.items())
            if value > 0 and used.get(name, Decimal(0)) + value > allocatable.get(name, Decimal(0))
        ]
        hint = "No preemption victims found for incoming pod"
    if not reasons:
        return None
    return (
        f"0/1 nodes are available: {', '.join(reasons)}. "
        f"preemption: 0/1 nodes are available: 1 {hint}."
    )

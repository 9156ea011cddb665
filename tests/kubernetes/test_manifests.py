"""The pure builders of kernel pods and Secrets: literal dicts, the OpenAPI schema, safety."""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from jupyter_client.kernelspec import KernelSpec

from provisioners.exceptions import ProvisionerConfigError
from provisioners.k8s import manifests as m
from provisioners.k8s.engine import PodEngine
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from provisioners.k8s.watch import kernel_exit_code, kernel_running, start_problem

pytestmark = pytest.mark.k8s

PORTS = (20001, 20002, 20003, 20004, 20005)
ARGV = ("python3", "-m", "ipykernel_launcher", "-f", m.CONNECTION_FILE)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECCTX = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
}


def validate(obj: dict[str, Any]) -> None:
    """Validate against the strict OpenAPI schema of the newest Kubernetes version shipped."""
    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        first = str(exc).splitlines()[0]
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']} does not validate: {first}")


def minimal(**overrides: Any) -> m.KernelPod:
    values: dict[str, Any] = {
        "name": "kernel-0123abcd",
        "namespace": "jupyter",
        "image": "example/kernel:1",
        "command": ARGV,
        "ports": PORTS,
        "kernel_id": "5c0ffee0-0000-4000-8000-000000000001",
        "secret_name": "kernel-0123abcd-connection",
        "owner": "server.4242.99",
    }
    values.update(overrides)
    return m.KernelPod(**values)


def test_minimal_pod_is_exactly_this() -> None:
    kid = "5c0ffee0-0000-4000-8000-000000000001"
    assert m.pod_manifest(minimal(env={"KERNEL_USERNAME": "alice"})) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "kernel-0123abcd",
            "namespace": "jupyter",
            "labels": {
                "app.kubernetes.io/managed-by": "cluster-provisioners",
                "app.kubernetes.io/component": "kernel",
                "cluster-provisioners/kernel-id": kid,
                "cluster-provisioners/owner": "server.4242.99",
            },
            "annotations": {
                "cluster-provisioners/kernel-id": kid,
                "cluster-provisioners/owner": "server.4242.99",
                "cluster-provisioners/ports": "[20001, 20002, 20003, 20004, 20005]",
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [
                {
                    "name": "connection-file",
                    "image": "example/kernel:1",
                    "imagePullPolicy": "IfNotPresent",
                    "command": [
                        "install",
                        "-m",
                        "0600",
                        "/run/jupyter-kernel-secret/connection.json",
                        "/run/jupyter-kernel/connection.json",
                    ],
                    "resources": {},
                    "securityContext": SECCTX,
                    "volumeMounts": [
                        {
                            "name": "connection-secret",
                            "mountPath": "/run/jupyter-kernel-secret",
                            "readOnly": True,
                        },
                        {"name": "kernel-runtime", "mountPath": "/run/jupyter-kernel"},
                    ],
                }
            ],
            "containers": [
                {
                    "name": "kernel",
                    "image": "example/kernel:1",
                    "imagePullPolicy": "IfNotPresent",
                    "command": list(ARGV),
                    "env": [{"name": "KERNEL_USERNAME", "value": "alice"}],
                    "ports": [
                        {"name": "shell", "containerPort": 20001, "protocol": "TCP"},
                        {"name": "iopub", "containerPort": 20002, "protocol": "TCP"},
                        {"name": "stdin", "containerPort": 20003, "protocol": "TCP"},
                        {"name": "hb", "containerPort": 20004, "protocol": "TCP"},
                        {"name": "control", "containerPort": 20005, "protocol": "TCP"},
                    ],
                    "resources": {},
                    "securityContext": SECCTX,
                    "volumeMounts": [
                        {"name": "kernel-runtime", "mountPath": "/run/jupyter-kernel"}
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "connection-secret",
                    "secret": {"secretName": "kernel-0123abcd-connection", "defaultMode": 0o400},
                },
                {"name": "kernel-runtime", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }


def full() -> m.KernelPod:
    return minimal(
        username="Alice Smith <alice@example.com>",
        kernelspec="python3-k8s",
        env={"KERNEL_USERNAME": "Alice Smith <alice@example.com>", "LANG": "C.UTF-8"},
        image_pull_policy="Always",
        image_pull_secrets=("regcred",),
        resources=m.Resources("500m", "2", "1Gi", "4Gi", 1),
        security=m.Security(run_as_user=1001, run_as_group=100, fs_group=100),
        scheduling=m.Scheduling(
            node_selector={"disktype": "ssd"},
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "gpu", "operator": "In", "values": ["a100"]}
                                ]
                            }
                        ]
                    }
                }
            },
            tolerations=({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},),
            priority_class_name="kernels",
            host_network=True,
            node_name="node-7",
        ),
        volumes=({"name": "data", "persistentVolumeClaim": {"claimName": "data"}},),
        volume_mounts=({"name": "data", "mountPath": "/home/jovyan/data"},),
        service_account_name="kernel-sa",
        labels={"team": "data science!"},
        annotations={"example.com/note": "anything: goes"},
        working_dir="/home/jovyan",
        grace_period=10,
    )


def test_every_option_lands_where_kubernetes_expects_it() -> None:
    pod = m.pod_manifest(full())
    spec = pod["spec"]
    kernel = spec["containers"][0]
    assert kernel["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    assert spec["initContainers"][0]["resources"] == kernel["resources"]
    assert spec["nodeSelector"] == {"disktype": "ssd", "kubernetes.io/hostname": "node-7"}
    assert spec["affinity"]["nodeAffinity"]
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "kernels"
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["serviceAccountName"] == "kernel-sa"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["terminationGracePeriodSeconds"] == 10
    assert spec["securityContext"]["runAsUser"] == 1001
    assert spec["securityContext"]["fsGroup"] == 100
    assert [v["name"] for v in spec["volumes"]] == ["connection-secret", "kernel-runtime", "data"]
    assert kernel["volumeMounts"][1] == {"name": "data", "mountPath": "/home/jovyan/data"}
    assert kernel["workingDir"] == "/home/jovyan"
    assert kernel["imagePullPolicy"] == "Always"
    assert pod["metadata"]["annotations"]["example.com/note"] == "anything: goes"
    assert pod["metadata"]["annotations"]["cluster-provisioners/username"] == (
        "Alice Smith <alice@example.com>"
    )
    for value in pod["metadata"]["labels"].values():
        assert LABEL_VALUE.match(value) and len(value) <= 63, value
    assert pod["metadata"]["labels"]["cluster-provisioners/username"].startswith("Alice-Smith")


def test_gpu_resource_name_is_configurable() -> None:
    res = m.resource_requirements(m.Resources(gpus=2, gpu_resource="amd.com/gpu"))
    assert res == {"limits": {"amd.com/gpu": "2"}}


def test_secret_is_exactly_this_and_owned_by_the_pod() -> None:
    pod = {"metadata": {"name": "kernel-0123abcd", "uid": "u-1"}}
    labels = m.kernel_labels("k1", "server.1.2")
    name = "kernel-0123abcd-connection"
    secret = m.secret_manifest(name, "jupyter", b'{"key": "k"}', labels, pod)
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "kernel-0123abcd-connection",
            "namespace": "jupyter",
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "kernel-0123abcd", "uid": "u-1"}
            ],
        },
        "type": "Opaque",
        "immutable": True,
        "data": {"connection.json": base64.b64encode(b'{"key": "k"}').decode()},
    }
    validate(secret)


@pytest.mark.parametrize("make", [minimal, full], ids=["minimal", "full"])
def test_pods_validate_against_the_openapi_schema(make: Any) -> None:
    validate(m.pod_manifest(make()))


def test_template_yaml_adds_and_overrides_but_keeps_what_we_rely_on() -> None:
    template = """
    metadata:
      name: hijacked
      labels: {team: ml, app.kubernetes.io/managed-by: someone-else}
    spec:
      restartPolicy: OnFailure
      runtimeClassName: gvisor
      volumes:
        - name: connection-secret
          emptyDir: {}
      initContainers:
        - name: connection-file
          image: evil
      containers:
        - name: kernel
          command: [sh, -c, "cat /run/jupyter-kernel/connection.json"]
          env:
            - {name: EXTRA, value: "1"}
          volumeMounts:
            - {name: kernel-runtime, mountPath: /elsewhere}
        - name: sidecar
          image: busybox
          command: [sleep, infinity]
    """
    spec = minimal(env={"A": "x"}, template=m.parse_pod_template(template))
    pod = m.pod_manifest(spec)
    validate(pod)
    assert pod["metadata"]["name"] == "kernel-0123abcd"
    assert pod["metadata"]["labels"]["team"] == "ml"
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cluster-provisioners"
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    assert pod["spec"]["volumes"][:2] == m.connection_volumes("kernel-0123abcd-connection")
    assert pod["spec"]["initContainers"] == [m.init_container(spec)]
    kernel, sidecar = pod["spec"]["containers"]
    assert kernel["command"] == list(ARGV)
    assert kernel["env"] == [{"name": "A", "value": "x"}, {"name": "EXTRA", "value": "1"}]
    assert kernel["volumeMounts"] == [
        {"name": "kernel-runtime", "mountPath": "/run/jupyter-kernel"}
    ]
    assert sidecar["name"] == "sidecar"


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "l": [{"name": "x", "v": 1}], "gone": 1}
    over = {"a": {"c": [3]}, "l": [{"name": "x", "w": 2}, {"name": "y"}], "gone": None}
    before = copy.deepcopy(base)
    assert m.deep_merge(base, over) == {
        "a": {"b": 1, "c": [3]},
        "l": [{"name": "x", "v": 1, "w": 2}, {"name": "y"}],
    }
    assert base == before


def test_builders_copy_their_inputs() -> None:
    env = {"A": "1"}
    volumes = ({"name": "d", "emptyDir": {}},)
    spec = minimal(env=env, volumes=volumes)
    pod = m.pod_manifest(spec)
    pod["spec"]["volumes"][2]["emptyDir"]["medium"] = "Memory"
    pod["spec"]["containers"][0]["env"].append({"name": "B", "value": "2"})
    assert volumes[0] == {"name": "d", "emptyDir": {}}
    assert env == {"A": "1"}
    assert m.pod_manifest(spec) == m.pod_manifest(minimal(env={"A": "1"}, volumes=volumes))


def test_parse_pod_template_errors() -> None:
    assert m.parse_pod_template("") == {}
    assert m.parse_pod_template({"spec": {}}) == {"spec": {}}
    with pytest.raises(ValueError, match="mapping"):
        m.parse_pod_template("- a list")
    with pytest.raises(ValueError, match="YAML"):
        m.parse_pod_template("a: [unclosed")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("alice", "alice"),
        ("5c0ffee0-0000-4000-8000-000000000001", "5c0ffee0-0000-4000-8000-000000000001"),
        ("alice@example.com", None),
        ("../../etc/passwd; rm -rf /", None),
        ("x" * 80, None),
        ("", ""),
        ("@@@", None),
    ],
)
def test_label_values_are_sanitized(text: str, expect: str | None) -> None:
    value = m.sanitize_label_value(text)
    assert LABEL_VALUE.match(value) and len(value) <= 63
    if expect is not None:
        assert value == expect
    else:
        assert value != text
        assert m.sanitize_label_value(text + "!") != value  # altered values stay distinct


def test_pod_names_come_from_a_fixed_alphabet() -> None:
    assert m.pod_name("kernel", "0123abcd") == "kernel-0123abcd"
    for bad in ("Kernel_", "a/b", "x" * 70):
        with pytest.raises(ValueError, match="DNS-1123"):
            m.pod_name(bad, "0")


def test_ports_held_on_node() -> None:
    def pod(ports: list[int], node: str = "", selector: str = "", phase: str = "Running") -> Any:
        spec: dict[str, Any] = {"hostNetwork": True}
        if node:
            spec["nodeName"] = node
        if selector:
            spec["nodeSelector"] = {m.HOSTNAME_LABEL: selector}
        meta = {"annotations": {m.ANNOTATION_PORTS: json.dumps(ports)}}
        return {"metadata": meta, "spec": spec, "status": {"phase": phase}}

    pods = [
        pod([1, 2], node="a"),
        pod([3], selector="a"),
        pod([4], node="b"),
        pod([5]),  # not scheduled yet: may land anywhere
        pod([6], node="a", phase="Succeeded"),
        {"metadata": {"annotations": {m.ANNOTATION_PORTS: "[7]"}}, "spec": {}},  # pod network
    ]
    assert m.ports_held_on_node(pods, "a") == {1, 2, 3, 5}
    assert m.ports_held_on_node(pods, None) == {1, 2, 3, 4, 5}


# ---------------------------------------------------------------------- reading pod status


def _pod(phase: str = "Pending", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": phase, **status}}


def test_start_problems_are_read_from_the_status() -> None:
    pull = _pod(
        containerStatuses=[
            {
                "name": "kernel",
                "state": {"waiting": {"reason": "ErrImagePull", "message": "not found: x"}},
            }
        ]
    )
    problem = start_problem(pull)
    assert problem is not None and problem.reason == "ErrImagePull"
    assert "not found: x" in str(problem)
    unsched = _pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ]
    )
    assert "Insufficient" in str(start_problem(unsched))
    assert start_problem(unsched, unschedulable_fails=False) is None
    crashed = _pod(
        "Failed",
        containerStatuses=[
            {"name": "kernel", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}
        ],
    )
    problem = start_problem(crashed)
    assert problem is not None and problem.wants_logs and "code 2" in str(problem)
    init_done = _pod(
        initContainerStatuses=[
            {"name": "connection-file", "state": {"terminated": {"exitCode": 0}}}
        ],
        containerStatuses=[
            {"name": "kernel", "state": {"waiting": {"reason": "ContainerCreating"}}}
        ],
    )
    assert start_problem(init_done) is None
    init_failed = _pod(
        initContainerStatuses=[
            {"name": "connection-file", "state": {"terminated": {"exitCode": 1}}}
        ]
    )
    assert start_problem(init_failed) is not None


def test_running_and_exit_codes() -> None:
    running = _pod("Running", containerStatuses=[{"name": "kernel", "state": {"running": {}}}])
    assert kernel_running(running) and kernel_exit_code(running) is None
    done = _pod(
        "Succeeded",
        containerStatuses=[{"name": "kernel", "state": {"terminated": {"exitCode": 0}}}],
    )
    assert kernel_exit_code(done) == 0
    assert kernel_exit_code(_pod("Failed")) == 1
    assert kernel_exit_code(None) == 1
    assert kernel_exit_code(_pod()) is None


# ---------------------------------------------------------------------- through the provisioner


def provisioner(tmp_path: Path, **config: Any) -> KubernetesClusterProvisioner:
    spec = KernelSpec(
        name="k8s-test", argv=["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    )
    spec.resource_dir = str(tmp_path)
    config.setdefault("image", "example/kernel:1")
    config.setdefault("namespace", "jupyter")
    return KubernetesClusterProvisioner(
        kernel_id="5c0ffee0-0000-4000-8000-000000000002", kernel_spec=spec, **config
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image", ""),
        ("namespace", "Not_A_Namespace"),
        ("cpu_limit", "two cores"),
        ("memory_request", "1 GB"),
        ("gpus", -1),
        ("pod_template", "- not: a mapping"),
        ("pod_name_prefix", "Kernel!"),
        ("labels", {"app.kubernetes.io/managed-by": "me"}),
        ("connection_mode", "carrier-pigeon"),
        ("no_such_option", 1),
    ],
)
def test_bad_config_is_an_error_naming_the_key(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ProvisionerConfigError) as info:
        provisioner(tmp_path, **{key: value})
    assert key in str(info.value)


def test_the_key_is_only_in_the_secret(tmp_path: Path) -> None:
    prov = provisioner(
        tmp_path,
        labels={"team": "x"},
        pod_template={"metadata": {"annotations": {"a": "b"}}},
        env={"EXTRA": "1"},
    )
    key = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    names = ["shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"]
    info: dict[str, Any] = dict(zip(names, PORTS, strict=True))
    info.update(transport="tcp", ip="0.0.0.0", key=key.encode(), signature_scheme="hmac-sha256")
    engine = prov.engine
    assert isinstance(engine, PodEngine)
    engine.kernel_info = info
    engine.pod_name = "kernel-0123abcd"
    engine.secret_name = m.secret_name_for(engine.pod_name)
    env = {"KERNEL_USERNAME": "bob", "EXTRA": "1"}
    cmd = engine.format_command(list(prov.kernel_spec.argv), [])
    pod, secret = engine.build_manifests(cmd, env, info)
    validate(pod)
    validate(secret)
    owned = engine.secret_manifest(
        info, {"metadata": {"name": engine.pod_name, "uid": "0000-1111"}}
    )
    validate(owned)  # the Secret as sent: owned by the created pod
    assert owned["metadata"]["ownerReferences"][0]["uid"] == "0000-1111"
    assert key not in json.dumps(pod)
    assert key not in json.dumps(secret["metadata"])
    stored = json.loads(base64.b64decode(secret["data"]["connection.json"]))
    assert stored["key"] == key and stored["ip"] == "0.0.0.0"
    assert stored["shell_port"] == PORTS[0]
    assert pod["spec"]["containers"][0]["command"][-1] == m.CONNECTION_FILE
    assert DNS_LABEL.match(pod["metadata"]["name"])


def test_a_warm_pod_carries_the_pool_label_and_a_claim_patch_replaces_it() -> None:
    spec = m.KernelPod(
        name="kernel-pool-0123",
        namespace="ns",
        image="img",
        command=("python3",),
        ports=(1, 2, 3, 4, 5),
        kernel_id="pool-0123",
        secret_name="kernel-pool-0123-connection",
        pool="pool-0123",
    )
    labels = m.pod_manifest(spec)["metadata"]["labels"]
    assert labels[m.LABEL_POOL] == "pool-0123" == labels[m.LABEL_KERNEL_ID]
    assert m.LABEL_POOL not in m.pod_manifest(replace(spec, pool=""))["metadata"]["labels"]
    assert m.claim_patch("Real Id/1") == {
        "metadata": {
            "labels": {m.LABEL_KERNEL_ID: m.sanitize_label_value("Real Id/1"), m.LABEL_POOL: None},
            "annotations": {m.ANNOTATION_KERNEL_ID: "Real Id/1"},
        }
    }

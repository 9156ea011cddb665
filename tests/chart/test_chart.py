"""Tests of the Helm chart in charts/cluster-provisioners.

They lint and render the chart with the default values and with several non-default value
sets, validate every rendered manifest against the Kubernetes OpenAPI schema
(kubernetes-validate, strict mode), check values.schema.json, and check security properties
of the rendered objects as data (RBAC, NetworkPolicy, token handling, securityContext).
A last test starts a real Jupyter Server with the rendered configuration.

helm comes from $HELM, $CLUSTER_PROVISIONERS_CACHE/bin/helm or
~/.cache/cluster-provisioners/bin/helm (``bash .ci/lib/helm.sh`` installs it there). Without
it the tests skip, except under CI (CI=true) where a missing helm fails them.

Nothing here imports the ``provisioners`` package.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config

from tests.chart.helmchart import (
    CHART,
    CLUSTER_SCOPED_KINDS,
    DEFAULT_KERNEL_NAMESPACE,
    FULLNAME,
    K8S_VERSIONS,
    KERNEL_NAMESPACE_RULES,
    KERNEL_POD_LABELS,
    NAMESPACE,
    OWNER_RULES,
    POOL_RULES,
    PORT_FORWARD_RULES,
    RELEASE,
    SCENARIOS,
    Rendered,
    chart_server,
    default_values,
    effective_values,
    http_get,
    kernel_namespaces,
    kernelspec_values,
    load_config,
    run_helm,
    values_schema,
)

pytestmark = pytest.mark.helm


# --------------------------------------------------------------------------- lint, render, schema


def test_helm_version(helm: str, helm_env: dict[str, str]) -> None:
    proc = run_helm(helm, helm_env, "version", "--short")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v4."), f"expected helm v4, got {proc.stdout!r}"


def test_lint(helm: str, helm_env: dict[str, str], values_dir: Path, scenario: str) -> None:
    proc = run_helm(
        helm,
        helm_env,
        "lint",
        "--strict",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "-f",
        str(values_dir / f"{scenario}.yaml"),
    )
    assert proc.returncode == 0, f"helm lint ({scenario}):\n{proc.stdout}\n{proc.stderr}"
    assert "0 chart(s) failed" in proc.stdout


def test_manifests_match_kubernetes_openapi(render, scenario: str) -> None:
    rendered = render(scenario)
    assert rendered.docs, "nothing rendered"
    errors = []
    for doc in rendered.docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(
                    f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message}"
                )
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(
                    f"{doc['kind']} {doc['apiVersion']}: no schema in Kubernetes {version}"
                )
    assert not errors, "\n".join(errors)


def test_rendered_kinds(render, scenario: str) -> None:
    rendered = render(scenario)
    values = rendered.values
    kinds = sorted(d["kind"] for d in rendered.docs)
    namespaces = kernel_namespaces(values)
    n_ns = len(namespaces)
    n_roles = n_ns + int(NAMESPACE not in namespaces)  # + get pods in the release namespace
    expected = {
        "ConfigMap": 1,
        "Deployment": 1,
        "Service": 1,
        "Pod": 1,  # helm test hook
        "Job": int(values["uninstallHook"]["enabled"]),  # pre-delete hook
        "Namespace": int(values["kernels"]["createNamespace"] and namespaces[0] != NAMESPACE),
        "Role": n_roles,
        "RoleBinding": n_roles,
        "NetworkPolicy": n_ns,
        "ServiceAccount": int(values["serviceAccount"]["create"]),
        "Secret": int(not values["auth"]["existingSecret"]),
        "Ingress": int(values["ingress"]["enabled"]),
        "DaemonSet": int(values["prePuller"]["enabled"]),
    }
    assert kinds == sorted(k for k, n in expected.items() for _ in range(n))
    names = [
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered.docs
    ]
    assert len(names) == len(set(names)), "duplicate objects"
    for doc in rendered.docs:
        assert len(doc["metadata"]["name"]) <= 63


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (["--set", "replicaCount=abc"], "replicaCount"),
        (["--set", "replicaCount=3"], "replicaCount"),
        (["--set", "kernels.portForward=sometimes"], "portForward"),
        (["--set", "service.port=http"], "port"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "server.baseUrl=kernels"], "baseUrl"),
        (["--set", "kernels.extraNamespaces[0]=Not_A_Namespace"], "extraNamespaces"),
        (["--set", "server.extraArgs[0]=--IdentityProvider.token=abc"], "extraArgs"),
        (["--set", "noSuchValue=1"], "noSuchValue"),
        (
            [
                "--set",
                "kernels.kernelspecs.python3.metadata.kernel_provisioner.config.fallback=local",
            ],
            "fallback",
        ),
        (["--set", "ingress.enabeld=true"], "enabeld"),
        (
            ["--set-json", 'kernels.kernelspecs={"bad/name":{"argv":["x"],"display_name":"x"}}'],
            "bad/name",
        ),
        (["--set", "kernels.pools.sizes.python3=-1"], "pools/sizes/python3"),
        (["--set-json", "kernels.pools.sizes.python3=1.5"], "pools/sizes/python3"),
        (["--set-json", 'kernels.pools.sizes.python3="2"'], "pools/sizes/python3"),
        (["--set", "kernels.pools.sizes.python3=101"], "pools/sizes/python3"),
        (["--set-json", 'kernels.pools.sizes={"bad/name":1}'], "bad/name"),
        (["--set", "kernels.pools.size.python3=1"], "size"),
        (["--set", "kernels.pools.maxTotal=-1"], "maxTotal"),
        (["--set", "kernels.pools.prefill=sometimes"], "prefill"),
        (
            [
                "--set",
                "kernels.kernelspecs.python3.metadata.kernel_provisioner.config.pool_size=-2",
            ],
            "pool_size",
        ),
    ],
)
def test_schema_rejects_bad_values(
    helm: str, helm_env: dict[str, str], setting: list[str], named: str
) -> None:
    proc = run_helm(helm, helm_env, "template", RELEASE, str(CHART), *setting)
    assert proc.returncode != 0, f"helm template accepted {setting}"
    assert "schema" in proc.stderr, proc.stderr
    assert named in proc.stderr, f"the error does not name {named!r}:\n{proc.stderr}"


def test_default_kernel_must_exist(helm: str, helm_env: dict[str, str]) -> None:
    proc = run_helm(
        helm, helm_env, "template", RELEASE, str(CHART), "--set", "server.defaultKernelName=nope"
    )
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "kernelspec" in proc.stderr


def test_values_yaml_matches_schema() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--schemafile",
            str(CHART / "values.schema.json"),
            str(CHART / "values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
def test_scenario_values_match_schema(scenario_name: str) -> None:
    jsonschema.Draft7Validator(values_schema()).validate(effective_values(scenario_name))


def test_port_forward_kernelspec_needs_port_forward(helm: str, helm_env: dict[str, str]) -> None:
    spec = kernelspec_values("PF", "img:1", connection_mode="port-forward")
    args = [
        "template",
        RELEASE,
        str(CHART),
        "--set-json",
        f"kernels.kernelspecs.pf={json.dumps(spec)}",
    ]
    assert run_helm(helm, helm_env, *args, "--set", "kernels.portForward=true").returncode == 0
    proc = run_helm(helm, helm_env, *args, "--set", "kernels.portForward=false")
    assert proc.returncode != 0
    assert "port-forward" in proc.stderr and "portForward" in proc.stderr


def test_schema_is_draft7_and_closed() -> None:
    schema = values_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False

    def check(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '/'} is open"
            for key, sub in node["properties"].items():
                check(sub, f"{path}.{key}")

    check(schema, "")


def _value_leaves(
    values: dict[str, Any], schema: dict[str, Any], prefix: str = ""
) -> Iterator[str]:
    """Dotted paths of every value; maps the schema leaves open (e.g. annotations) are leaves."""
    for key, value in values.items():
        sub = schema.get("properties", {}).get(key)
        assert sub is not None, f"values.yaml has {prefix}{key}, values.schema.json does not"
        if isinstance(value, dict) and "properties" in sub:
            yield from _value_leaves(value, sub, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_value_in_schema_and_readme() -> None:
    leaves = list(_value_leaves(default_values(), values_schema()))
    assert "kernels.portForward" in leaves and "replicaCount" in leaves
    readme = (CHART / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+?) \|", readme, flags=re.MULTILINE))
    missing = [leaf for leaf in leaves if leaf not in rows]
    assert not missing, f"README.md does not document {missing}"
    # Rows of other tables (e.g. `pods` in the permissions table) do not name values.
    stale = [row for row in rows if row.split(".")[0] in default_values() and row not in leaves]
    assert not stale, f"README.md documents values that do not exist: {stale}"
    # Scalar defaults are shown as they are in values.yaml.
    for leaf in leaves:
        value: Any = default_values()
        for part in leaf.split("."):
            value = value[part]
        if isinstance(value, bool | int) or (isinstance(value, str) and value):
            shown = json.dumps(value) if isinstance(value, bool) else str(value)
            assert shown in rows[leaf], (
                f"README default of {leaf} is {rows[leaf]}, values.yaml has {value!r}"
            )
        elif value == "":
            assert rows[leaf] == '`""`', f'README default of {leaf} should be `""`'


# --------------------------------------------------------------------------- RBAC


def test_rbac_is_namespaced_and_exact(render, scenario: str) -> None:
    """Each kernel namespace's Role grants what the provisioner calls, no more; the release
    namespace only get on pods; nothing cluster-scoped but the kernels' own Namespace."""
    rendered = render(scenario)
    values = rendered.values
    namespaces = kernel_namespaces(values)
    for doc in rendered.docs:
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert doc["kind"] == "Namespace", f"cluster-scoped {doc['kind']} rendered"
            assert doc["metadata"]["name"] == namespaces[0]
    roles = {r["metadata"]["namespace"]: r for r in rendered.of_kind("Role")}
    assert sorted(roles) == sorted({*namespaces, NAMESPACE})
    for ns, role in roles.items():
        granted: dict[str, set[str]] = {}
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
            assert rule["apiGroups"] == [""], rule
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {rule}"
            if "resourceNames" in rule:
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule
                assert rule["resourceNames"] == values["rbac"]["secretNames"]
                continue
            for resource in rule["resources"]:
                granted.setdefault(resource, set()).update(rule["verbs"])
        expected: dict[str, set[str]] = {}
        if ns in namespaces:
            expected = {k: set(v) for k, v in KERNEL_NAMESPACE_RULES.items()}
            if values["kernels"]["portForward"]:
                expected.update(PORT_FORWARD_RULES)
            pooled = any(size and size > 0 for size in _pool_sizes(rendered).values())
            if pooled or values["kernels"]["persist"]:  # relabel a claim / mark a detach
                for resource, verbs in POOL_RULES.items():
                    expected[resource] |= verbs
        if ns == NAMESPACE:
            for resource, verbs in OWNER_RULES.items():
                expected.setdefault(resource, set()).update(verbs)
        assert granted == expected, f"{scenario}: Role in {ns}"


def test_kernels_default_to_their_own_namespace(render) -> None:
    rendered = render("default")
    assert kernel_namespaces(rendered.values) == [DEFAULT_KERNEL_NAMESPACE]
    config = rendered.configmap_file("jupyter_server_config.py")
    assert f'c.KubernetesClusterProvisioner.namespace = "{DEFAULT_KERNEL_NAMESPACE}"' in config
    # Neither the token Secret nor Helm's release Secrets can be read by the server's account.
    release_role = next(
        r for r in rendered.of_kind("Role") if r["metadata"]["namespace"] == NAMESPACE
    )
    assert [rule["resources"] for rule in release_role["rules"]] == [["pods"]]
    assert rendered.values["kernels"]["portForward"] is False


def test_server_pod_is_the_kernels_owner(render) -> None:
    """The server learns its pod's identity (downward API) and the release label."""
    env = {e["name"]: e for e in render("default").server_container["env"]}
    for name, field in (
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
        ("POD_UID", "metadata.uid"),
    ):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == field
    assert env["CLUSTER_PROVISIONERS_RELEASE"]["value"] == f"{NAMESPACE}.{RELEASE}"


def test_uninstall_hook_removes_the_releases_kernels(render, scenario: str) -> None:
    rendered = render(scenario)
    job = rendered.one("Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rendered.server_pod["spec"]["serviceAccountName"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:4] == ["jupyter-provisioners", "cleanup", "--release", f"{NAMESPACE}.{RELEASE}"]
    named = [command[i + 1] for i, arg in enumerate(command) if arg == "--namespace"]
    assert named == kernel_namespaces(rendered.values)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rolebindings_bind_the_server_account(render, scenario: str) -> None:
    rendered = render(scenario)
    account = rendered.server_pod["spec"]["serviceAccountName"]
    if rendered.values["serviceAccount"]["create"]:
        assert rendered.one("ServiceAccount")["metadata"]["name"] == account
    else:
        assert account == rendered.values["serviceAccount"]["name"]
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in rendered.of_kind("Role")}
    for binding in rendered.of_kind("RoleBinding"):
        ns = binding["metadata"]["namespace"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": binding["roleRef"]["name"],
        }
        assert (ns, binding["roleRef"]["name"]) in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]


def test_portforward_toggle(render) -> None:
    on = render("prepuller")
    off = render("default")
    assert on.values["kernels"]["portForward"] is True
    assert off.values["kernels"]["portForward"] is False

    def resources(r: Rendered) -> set[str]:
        return {
            res for role in r.of_kind("Role") for rule in role["rules"] for res in rule["resources"]
        }

    assert "pods/portforward" in resources(on)
    assert "pods/portforward" not in resources(off)


# --------------------------------------------------------------------------- network


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are expected"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policy_isolates_kernel_pods(render, scenario: str) -> None:
    rendered = render(scenario)
    policies = rendered.of_kind("NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == sorted(
        kernel_namespaces(rendered.values)
    )
    server_labels = rendered.server_pod["metadata"]["labels"]
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"] == {"matchLabels": KERNEL_POD_LABELS}
        assert _selects(spec["podSelector"], {**KERNEL_POD_LABELS, "kernel-id": "x"})
        assert not _selects(spec["podSelector"], server_labels), (
            "the policy must not select the server"
        )
        assert "Ingress" in spec["policyTypes"]
        assert len(spec["ingress"]) == 1
        (rule,) = spec["ingress"]
        assert "ports" not in rule or rule["ports"]
        (peer,) = rule["from"]
        assert set(peer) == {"namespaceSelector", "podSelector"}, (
            "a peer must name namespace AND pods"
        )
        assert peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
        }
        assert _selects(peer["podSelector"], server_labels)
        assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "server"
        assert not _selects(peer["podSelector"], KERNEL_POD_LABELS)


def test_service_and_ingress_reach_the_server(render, scenario: str) -> None:
    rendered = render(scenario)
    service = rendered.one("Service")
    assert _selects(
        {"matchLabels": service["spec"]["selector"]}, rendered.server_pod["metadata"]["labels"]
    )
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert {
        "name": "http",
        "containerPort": rendered.values["server"]["port"],
        "protocol": "TCP",
    } in (rendered.server_container["ports"])
    for ingress in rendered.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend == {
                    "name": service["metadata"]["name"],
                    "port": {"number": port["port"]},
                }
    if scenario == "ingress":
        ingress = rendered.one("Ingress")
        assert ingress["spec"]["ingressClassName"] == "nginx"
        assert ingress["spec"]["tls"][0]["secretName"] == "kernels-tls"
        probe = rendered.server_container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/kernels/api"


# --------------------------------------------------------------------------- token


def _all_containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in rendered.pod_specs():
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{where}/{container['name']}", container


def test_token_comes_from_a_secret(render, scenario: str) -> None:
    rendered = render(scenario)
    values = rendered.values
    existing = values["auth"]["existingSecret"]
    secret_name = existing or f"{FULLNAME}-token"
    secret_key = values["auth"]["existingSecretKey"] if existing else "token"
    token = None
    if existing:
        assert not rendered.of_kind("Secret"), (
            "the chart must not create a Secret for an existing one"
        )
    else:
        secret = rendered.one("Secret", secret_name)
        token = base64.b64decode(secret["data"][secret_key]).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{48}", token), "expected a random 48-character token"

    # The server reads the token from a file of a Secret volume.
    container = rendered.server_container
    env = {e["name"]: e for e in container["env"]}
    assert "JUPYTER_TOKEN" not in env
    token_file = env["JUPYTER_TOKEN_FILE"]["value"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.server_pod["spec"]["volumes"]}
    (volume_name,) = [n for n, m in mounts.items() if token_file.startswith(m["mountPath"] + "/")]
    volume = volumes[volume_name]["secret"]
    assert volume["secretName"] == secret_name
    relative = token_file[len(mounts[volume_name]["mountPath"]) + 1 :]
    assert {"key": secret_key, "path": relative} in volume["items"]
    assert mounts[volume_name]["readOnly"] is True

    # The test hook gets it from the same Secret.
    hook = rendered.one("Pod")
    hook_env = {e["name"]: e for e in hook["spec"]["containers"][0]["env"]}
    assert hook_env["TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": secret_name,
        "key": secret_key,
    }

    # The token never appears on a command line, in a literal env value or in the ConfigMap.
    for where, c in _all_containers(rendered):
        argv = [*c.get("command", []), *c.get("args", [])]
        for arg in argv:
            assert not re.search(r"(?i)(^|[.-])token=", arg), (
                f"{where}: token option on the command line: {arg}"
            )
            if token:
                assert token not in arg, f"{where}: token on the command line"
        for e in c.get("env", []):
            if "token" in e["name"].lower() and e["name"] != "JUPYTER_TOKEN_FILE":
                assert "valueFrom" in e and "value" not in e, (
                    f"{where}: literal token variable {e['name']}"
                )
            if token and "value" in e:
                assert token not in e["value"], f"{where}: token in env {e['name']}"
    config_map = rendered.one("ConfigMap", FULLNAME)
    if token:
        assert all(token not in text for text in config_map["data"].values())
    assert "IdentityProvider.token" not in rendered.configmap_file("jupyter_server_config.py")


def test_generated_token_is_random_per_render(helm: str, helm_env: dict[str, str]) -> None:
    """Without a cluster `lookup` finds nothing: each render draws a new token. (On upgrade the
    chart reads the existing Secret back instead.)"""

    def token() -> str:
        proc = run_helm(
            helm, helm_env, "template", RELEASE, str(CHART), "--show-only", "templates/secret.yaml"
        )
        assert proc.returncode == 0, proc.stderr
        return yaml.safe_load(proc.stdout)["data"]["token"]

    assert token() != token()
    text = (CHART / "templates" / "secret.yaml").read_text()
    assert "lookup" in text and "randAlphaNum" in text


# --------------------------------------------------------------------------- pods


def test_pods_are_locked_down(render, scenario: str) -> None:
    rendered = render(scenario)
    for where, spec in rendered.pod_specs():
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == 1000, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
        for container in spec.get("initContainers", []) + spec["containers"]:
            name = f"{where}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name
            assert not sc.get("privileged"), name
            assert sc.get("runAsNonRoot", pod_sc["runAsNonRoot"]) is True, name
            assert "resources" in container, name
            for mount in container.get("volumeMounts", []):
                assert not mount["mountPath"].endswith(".sock"), f"{name}: mounts a socket"
    # The server writes only to /tmp, an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in rendered.server_container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.server_pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e.get("value") for e in rendered.server_container["env"]}
    assert env["HOME"].startswith("/tmp") and env["JUPYTER_RUNTIME_DIR"].startswith("/tmp")
    assert rendered.server_container["command"] == ["jupyter", "server"]


def test_prepuller_pulls_every_kernel_image(render) -> None:
    assert not render("default").of_kind("DaemonSet")
    rendered = render("prepuller")
    daemonset = rendered.one("DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    images = [c["image"] for c in spec["initContainers"]]
    assert sorted(images) == sorted(
        {
            rendered.values["kernels"]["image"],
            "registry.example.org/kernel-gpu:1",
            "registry.example.org/tools/kernel-r:4",
        }
    )
    for container in spec["initContainers"]:
        assert container["command"] == ["true"]
    assert not spec.get("volumes"), "the pre-puller mounts nothing"
    assert spec["automountServiceAccountToken"] is False
    (pause,) = spec["containers"]
    assert pause["image"] == rendered.values["prePuller"]["pauseImage"]


# --------------------------------------------------------------------------- Jupyter config


def test_jupyter_config(render, scenario: str) -> None:
    rendered = render(scenario)
    values = rendered.values
    c = load_config(rendered)
    assert c.ServerApp.ip == "0.0.0.0"
    assert c.ServerApp.open_browser is False
    assert c.ServerApp.port == values["server"]["port"]
    expected_base = (
        "/" + values["server"]["baseUrl"].strip("/") + "/"
        if values["server"]["baseUrl"].strip("/")
        else "/"
    )
    assert c.ServerApp.base_url == expected_base
    assert c.ServerApp.trust_xheaders is values["server"]["trustXheaders"]
    assert c.KubernetesClusterProvisioner.namespace == kernel_namespaces(values)[0]
    assert c.MappingKernelManager.default_kernel_name == values["server"]["defaultKernelName"]
    assert c.KernelPools.max_total == values["kernels"]["pools"]["maxTotal"]
    # The config file is found through JUPYTER_CONFIG_PATH.
    env = {e["name"]: e.get("value") for e in rendered.server_container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in rendered.server_container["volumeMounts"]}
    assert env["JUPYTER_CONFIG_PATH"] == mounts["config"]
    assert env["JUPYTER_PATH"] + "/kernels" == mounts["kernelspecs"]
    if values["server"]["onlyChartKernelspecs"]:
        assert c.KernelSpecManager.allowed_kernelspecs == sorted(values["kernels"]["kernelspecs"])
        assert c.KernelSpecManager.ensure_native_kernel is False


def _kernelspecs(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """The kernel.json files of the ConfigMap, by kernelspec name."""
    data = rendered.one("ConfigMap", FULLNAME)["data"]
    return {
        k[len("kernelspec.") : -len(".json")]: json.loads(v)
        for k, v in data.items()
        if k.startswith("kernelspec.")
    }


def test_kernelspecs(render, scenario: str) -> None:
    rendered = render(scenario)
    values = rendered.values
    specs = _kernelspecs(rendered)
    assert sorted(specs) == sorted(values["kernels"]["kernelspecs"])
    default = specs["python3"]
    assert default["argv"][-1] == "{connection_file}"
    provisioner = default["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "cluster-kubernetes-provisioner"
    assert provisioner["config"]["image"] == values["kernels"]["image"]
    # A local fallback would run a kernel inside the server pod: never by default.
    assert provisioner["config"]["fallback"] == "none"
    assert load_config(rendered).ClusterProvisioner.fallback == "none"
    # Each key is mounted as <name>/kernel.json.
    (volume,) = [v for v in rendered.server_pod["spec"]["volumes"] if v["name"] == "kernelspecs"]
    items = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert items == {f"kernelspec.{name}.json": f"{name}/kernel.json" for name in specs}


def test_config_change_rolls_the_server(helm: str, helm_env: dict[str, str]) -> None:
    def checksum(*extra: str) -> str:
        proc = run_helm(
            helm,
            helm_env,
            "template",
            RELEASE,
            str(CHART),
            "--show-only",
            "templates/deployment.yaml",
            *extra,
        )
        assert proc.returncode == 0, proc.stderr
        return yaml.safe_load(proc.stdout)["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "kernels.image=other/kernel:2")


# --------------------------------------------------------------------------- warm kernel pools


def _pool_sizes(rendered: Rendered) -> dict[str, int | None]:
    """pool_size of each rendered kernelspec's provisioner config (None: not set)."""
    return {
        name: spec.get("metadata", {})
        .get("kernel_provisioner", {})
        .get("config", {})
        .get("pool_size")
        for name, spec in _kernelspecs(rendered).items()
    }


def _template(helm: str, helm_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_helm(
        helm, helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args
    )


def test_default_values_render_no_pool(render) -> None:
    rendered = render("default")
    assert _pool_sizes(rendered) == {"python3": None}
    c = load_config(rendered)
    assert c.KernelPools.max_total == 8
    assert "prefill" not in c.KernelPools
    # kernels.persist (on by default) enables only the persistence extension
    assert c.ServerApp.jpserver_extensions == {"provisioners.persist": True}
    assert c.ClusterProvisioner.persist_kernels is True
    assert c.ClusterProvisioner.adoption_grace == 900
    assert "provisioners.pool" not in rendered.configmap_file("jupyter_server_config.py")


def test_pool_sizes_render_into_kernelspecs(render) -> None:
    rendered = render("pools")
    assert _pool_sizes(rendered) == {"python3": 3, "gpu": 0, "small": 2, "analysis": 1}
    # Nothing else of a kernelspec changes.
    python3 = _kernelspecs(rendered)["python3"]["metadata"]["kernel_provisioner"]
    assert python3["config"] == {
        "image": rendered.values["kernels"]["image"],
        "fallback": "none",
        "pool_size": 3,
    }
    assert python3["provisioner_name"] == "cluster-kubernetes-provisioner"
    c = load_config(rendered)
    assert c.KernelPools.max_total == 6
    # Every kernelspec with a pool (from kernels.pools.sizes or its own config), sorted.
    assert c.KernelPools.prefill == ["analysis", "python3", "small"]
    extensions = {"provisioners.persist": True, "provisioners.pool": True}
    assert c.ServerApp.jpserver_extensions == extensions
    text = rendered.configmap_file("jupyter_server_config.py")
    assert "c.KernelPools.max_total = 6\n" in text
    assert 'c.KernelPools.prefill = ["analysis","python3","small"]\n' in text
    assert (
        f"c.ServerApp.jpserver_extensions = {json.dumps(extensions).replace('true', 'True')}\n"
        in text
    )


def test_pools_without_prefill_still_drain(helm: str, helm_env: dict[str, str]) -> None:
    """prefill false: no pool fills at start, but the extension is on to drain them at stop."""
    proc = _template(
        helm,
        helm_env,
        "--show-only",
        "templates/configmap.yaml",
        "--set",
        "kernels.pools.sizes.python3=2",
        "--set",
        "kernels.pools.prefill=false",
        "--set",
        "kernels.pools.maxTotal=0",
    )
    assert proc.returncode == 0, proc.stderr
    config_map = yaml.safe_load(proc.stdout)
    spec = json.loads(config_map["data"]["kernelspec.python3.json"])
    assert spec["metadata"]["kernel_provisioner"]["config"]["pool_size"] == 2
    config = Config()
    exec(config_map["data"]["jupyter_server_config.py"], {"get_config": lambda: config})
    assert config.KernelPools.prefill == []
    assert config.KernelPools.max_total == 0
    assert config.ServerApp.jpserver_extensions["provisioners.pool"] is True


def test_persistence_off_and_sessions_on_a_volume(helm: str, helm_env: dict[str, str]) -> None:
    """kernels.persist=false: no persistence extension, no patch verbs; a sessions claim
    puts the sessions database on that volume."""
    proc = _template(
        helm,
        helm_env,
        "--set",
        "kernels.persist=false",
        "--set",
        "server.sessions.existingClaim=server-sessions",
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    config_map = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and "data" in d and "jupyter_server_config.py" in d["data"]
    )
    config = Config()
    exec(config_map["data"]["jupyter_server_config.py"], {"get_config": lambda: config})
    assert "jpserver_extensions" not in config.ServerApp
    assert "persist_kernels" not in config.ClusterProvisioner
    path = config.SessionManager.database_filepath
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "sessions"]
    assert path.startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "sessions"]
    assert volume["persistentVolumeClaim"] == {"claimName": "server-sessions"}
    assert pod["terminationGracePeriodSeconds"] == 30
    for role in (d for d in docs if d["kind"] == "Role"):
        assert all("patch" not in rule["verbs"] for rule in role["rules"])


def test_pool_size_of_no_kernelspec_fails(helm: str, helm_env: dict[str, str]) -> None:
    proc = _template(helm, helm_env, "--set", "kernels.pools.sizes.pyhton3=2")
    assert proc.returncode != 0
    assert 'kernels.pools.sizes names "pyhton3", which is no kernelspec' in proc.stderr
    assert "python3" in proc.stderr  # the kernelspecs that exist are listed
    # A kernelspec removed with null is no kernelspec either.
    proc = _template(
        helm,
        helm_env,
        "--set-json",
        f"kernels.kernelspecs.other={json.dumps(kernelspec_values('Other', 'img:1'))}",
        "--set",
        "server.defaultKernelName=other",
        "--set",
        "kernels.kernelspecs.python3=null",
        "--set",
        "kernels.pools.sizes.python3=1",
    )
    assert proc.returncode != 0
    assert 'names "python3", which is no kernelspec' in proc.stderr


def test_pool_needs_a_provisioner(helm: str, helm_env: dict[str, str]) -> None:
    """jupyter_client's default local provisioner ignores pool_size: refuse it loudly."""
    bare = json.dumps({"argv": ["python"], "display_name": "Bare"})
    args = ["--set-json", f"kernels.kernelspecs.bare={bare}"]
    proc = _template(helm, helm_env, *args, "--set", "kernels.pools.sizes.bare=1")
    assert proc.returncode != 0
    assert '"bare"' in proc.stderr and "provisioner_name" in proc.stderr
    # Size 0 adds nothing to such a kernelspec.
    proc = _template(
        helm,
        helm_env,
        *args,
        "--set",
        "kernels.pools.sizes.bare=0",
        "--show-only",
        "templates/configmap.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)["data"]
    assert json.loads(data["kernelspec.bare.json"]) == json.loads(bare)
    assert "provisioners.pool" not in data["jupyter_server_config.py"]


# --------------------------------------------------------------------------- the real server


def test_jupyter_server_starts_with_rendered_config(render, tmp_path: Path) -> None:
    """Run `jupyter server` (this Python's jupyter_server) with the chart's config file,
    kernelspec files and token file, laid out as in the pod but under tmp_path."""
    rendered = render("ingress")  # non-trivial base_url
    token = base64.b64decode(rendered.one("Secret")["data"]["token"]).decode()
    with chart_server(rendered, tmp_path) as server:
        base = server.base
        assert base.endswith("/kernels/")
        assert Path(server.env["JUPYTER_TOKEN_FILE"]).read_text() == token
        assert http_get(base + "api/kernelspecs")[0] == 403, "kernelspecs served without the token"
        assert http_get(base + "api/terminals", token)[0] == 404, "terminals must be disabled"
        assert http_get(base + "api/kernelspecs", "wrong-token")[0] == 403
        status, body = http_get(base + "api/kernelspecs", token)
        assert status == 200, body
        listing = json.loads(body)
        assert listing["default"] == "python3"
        registered = {ep.name for ep in entry_points(group="jupyter_client.kernel_provisioners")}
        if "cluster-kubernetes-provisioner" in registered:
            # Only the chart's kernelspecs, with their provisioner metadata.
            assert sorted(listing["kernelspecs"]) == ["python3"]
            spec = listing["kernelspecs"]["python3"]["spec"]
            assert (
                spec["metadata"]["kernel_provisioner"]["provisioner_name"]
                == "cluster-kubernetes-provisioner"
            )
        else:
            # jupyter_client hides kernelspecs whose provisioner is not installed.
            assert listing["kernelspecs"] == {} or sorted(listing["kernelspecs"]) == ["python3"]
        server_log = server.log()
        assert "not recognized" not in server_log, f"config the server ignores:\n{server_log}"
        assert token not in server_log, "the token was logged"

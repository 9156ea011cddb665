"""The chart's values for many users (issue 22): ``access.*`` (identity from a token file
or JupyterHub, admins, quotas) and ``kernels.userVolume.*`` (a claim per user).

Rendered with ``helm template`` and checked as data (Kubernetes OpenAPI, where each
Secret is referenced, the Jupyter config it writes), and once with a real Jupyter Server
run with the rendered config, which must know every setting the chart writes.

Nothing here imports the ``provisioners`` package.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helmchart import (
    CHART,
    FULLNAME,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    Rendered,
    chart_server,
    http_get,
    kernelspec_values,
    load_config,
    run_helm,
)
from tests.helpers.hub import GROUP, SERVICE_SCOPE, Hub

pytestmark = pytest.mark.helm

HUB = {
    "access": {
        "enabled": True,
        "hub": {
            "apiUrl": "http://hub.jhub.svc.cluster.local:8081/hub/api",
            "serviceName": "kernels",
            "apiTokenSecret": {"name": "hub", "key": "hub.services.kernels.apiToken"},
            "cacheTtl": 30,
        },
        "tokenFile": {"existingSecret": "kernel-users", "key": "users.json"},
        "adminUsers": ["ops"],
        "adminGroups": ["platform"],
        "quotas": {"maxKernelsPerUser": 3, "maxCpuPerUser": 4.5, "maxMemoryPerUser": "16Gi"},
    }
}
USER_VOLUME = {
    "access": {"enabled": True},
    "kernels": {
        "userVolume": {
            "enabled": True,
            "size": "5Gi",
            "storageClass": "standard",
            "mountPath": "/home/jovyan/work",
        },
        "kernelspecs": {
            # Its own mount path: kept. A kernelspec of another provisioner: untouched.
            "own": kernelspec_values("Own", "img:1", user_volume_mount_path="/data"),
            "plain": {"display_name": "Plain", "argv": ["python", "-m", "ipykernel_launcher"]},
        },
    },
}


def template(helm: str, helm_env: dict[str, str], values: dict[str, Any], tmp_path: Path) -> Any:
    """``helm template`` with ``values``; the process (its manifests on stdout)."""
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(path)]
    return run_helm(helm, helm_env, *args, "--kube-version", K8S_VERSIONS[-1])


def render(helm: str, helm_env: dict[str, str], values: dict[str, Any], tmp_path: Path) -> Rendered:
    proc = template(helm, helm_env, values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rendered = Rendered("default", [d for d in yaml.safe_load_all(proc.stdout) if d])
    for doc in rendered.docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    return rendered


def env_of(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in rendered.server_container["env"]}


def kernelspecs(rendered: Rendered) -> dict[str, dict[str, Any]]:
    data = rendered.one("ConfigMap", FULLNAME)["data"]
    return {k[11:-5]: json.loads(v) for k, v in data.items() if k.startswith("kernelspec.")}


def kernel_rules(rendered: Rendered) -> dict[str, set[str]]:
    """Resource -> verbs of the kernel namespace's Role."""
    (role,) = [r for r in rendered.of_kind("Role") if r["metadata"]["namespace"] != NAMESPACE]
    rules: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for resource in rule["resources"]:
            rules.setdefault(resource, set()).update(rule["verbs"])
    return rules


def test_default_has_no_access_layer(helm: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    rendered = render(helm, helm_env, {}, tmp_path)
    c = load_config(rendered)
    assert "provisioners.access" not in c.ServerApp.jpserver_extensions
    assert "identity_provider_class" not in c.ServerApp
    assert "KernelAccess" not in c
    assert "JUPYTERHUB_API_TOKEN" not in env_of(rendered)
    assert "users" not in {v["name"] for v in rendered.server_pod["spec"]["volumes"]}
    assert "persistentvolumeclaims" not in kernel_rules(rendered)
    for spec in kernelspecs(rendered).values():
        assert "user_volume_mount_path" not in json.dumps(spec)


def test_hub_values_render_the_access_config(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    rendered = render(helm, helm_env, HUB, tmp_path)
    c = load_config(rendered)
    assert c.ServerApp.identity_provider_class == "provisioners.access.AccessIdentityProvider"
    assert c.ServerApp.jpserver_extensions["provisioners.access"] is True
    assert c.ServerApp.jpserver_extensions["provisioners.persist"] is True  # kept
    access = c.KernelAccess
    assert access.hub_api_url == HUB["access"]["hub"]["apiUrl"]
    assert access.hub_service_name == "kernels"
    assert access.cache_ttl == 30
    assert (access.admin_users, access.admin_groups) == (["ops"], ["platform"])
    assert access.max_kernels_per_user == 3
    assert access.max_cpu_per_user == 4.5
    assert access.max_memory_per_user == "16Gi"

    # The service's api_token: an env from its Secret, never a value or in the ConfigMap.
    env = env_of(rendered)
    assert env["JUPYTERHUB_API_TOKEN"] == {
        "name": "JUPYTERHUB_API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hub", "key": "hub.services.kernels.apiToken"}},
    }
    assert "hub_api_token" not in access
    # The token file: a read-only Secret volume at the path the config names.
    mounts = {m["name"]: m for m in rendered.server_container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.server_pod["spec"]["volumes"]}
    assert mounts["users"]["readOnly"] is True
    assert volumes["users"]["secret"]["secretName"] == "kernel-users"
    (item,) = volumes["users"]["secret"]["items"]
    assert item["key"] == "users.json"
    assert access.token_file == f"{mounts['users']['mountPath']}/{item['path']}"
    # The chart's own token is still the server's (the admin's), from its Secret.
    assert env["JUPYTER_TOKEN_FILE"]["value"].startswith(mounts["token"]["mountPath"] + "/")
    # A new config rolls the server.
    assert rendered.server_pod["metadata"]["annotations"]["checksum/config"]


def test_access_without_a_hub_or_token_file(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """Only the chart's token (the admin) and quotas: no Hub URL, no file, no token env."""
    rendered = render(helm, helm_env, {"access": {"enabled": True}}, tmp_path)
    c = load_config(rendered)
    assert c.KernelAccess.hub_api_url == ""
    assert c.KernelAccess.token_file == ""
    assert c.KernelAccess.hub_service_name == "gateway"
    assert "JUPYTERHUB_API_TOKEN" not in env_of(rendered)
    assert "users" not in {v["name"] for v in rendered.server_pod["spec"]["volumes"]}


def test_user_volume_goes_into_kubernetes_kernelspecs(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    rendered = render(helm, helm_env, USER_VOLUME, tmp_path)
    specs = kernelspecs(rendered)
    config = specs["python3"]["metadata"]["kernel_provisioner"]["config"]
    assert config["user_volume_mount_path"] == "/home/jovyan/work"
    assert config["user_volume_size"] == "5Gi"
    assert config["user_volume_storage_class"] == "standard"
    own = specs["own"]["metadata"]["kernel_provisioner"]["config"]
    assert own["user_volume_mount_path"] == "/data"
    assert "metadata" not in specs["plain"]
    # The server may get and create claims in the kernel namespace, nothing more on them.
    assert kernel_rules(rendered)["persistentvolumeclaims"] == {"create", "get"}


def test_a_kernelspecs_own_user_volume_gets_the_rbac_rule(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    values = {
        "access": {"enabled": True},
        "kernels": {
            "kernelspecs": {"own": kernelspec_values("Own", "img:1", user_volume_mount_path="/d")}
        },
    }
    rendered = render(helm, helm_env, values, tmp_path)
    assert kernel_rules(rendered)["persistentvolumeclaims"] == {"create", "get"}


def test_user_volume_needs_the_access_layer(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """Without it the user is whatever KERNEL_USERNAME the request says."""
    values = {"kernels": {"userVolume": {"enabled": True}}}
    proc = template(helm, helm_env, values, tmp_path)
    assert proc.returncode != 0
    assert "kernels.userVolume.enabled needs access.enabled" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("access.enabled=yes", "enabled"),
        ("access.quotas.maxKernelsPerUser=-1", "maxKernelsPerUser"),
        ("access.quotas.maxCpuPerUser=lots", "maxCpuPerUser"),
        ("access.quotas.maxMemoryPerUser=16 gigs", "maxMemoryPerUser"),
        ("access.hub.apiUrl=hub:8081", "apiUrl"),
        ("access.hub.serviceName=a/b", "serviceName"),
        ("access.hub.apiTokenSecret.key=", "key"),
        ("access.tokenFile.existingSecret=Not_A_Secret", "existingSecret"),
        ("access.hub.cacheTtl=-1", "cacheTtl"),
        ("access.hub.token=abc", "token"),
        ("kernels.userVolume.size=big", "size"),
        ("kernels.userVolume.mountPath=relative", "mountPath"),
    ],
)
def test_schema_rejects_bad_access_values(
    helm: str, helm_env: dict[str, str], setting: str, named: str
) -> None:
    proc = run_helm(helm, helm_env, "template", RELEASE, str(CHART), "--set", setting)
    assert proc.returncode != 0, f"helm template accepted {setting}"
    assert "schema" in proc.stderr and named in proc.stderr, proc.stderr


def test_cpu_cap_from_set_is_a_number(helm: str, helm_env: dict[str, str]) -> None:
    """``--set access.quotas.maxCpuPerUser=2.5`` arrives as text; the config has 2.5."""
    proc = run_helm(
        helm,
        helm_env,
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "access.enabled=true",
        "--set",
        "access.quotas.maxCpuPerUser=2.5",
        "--show-only",
        "templates/configmap.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    assert "c.KernelAccess.max_cpu_per_user = 2.5\n" in proc.stdout


def test_server_runs_the_rendered_access_config(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """A real `jupyter server` with the rendered config and a token file laid out as the
    pod mounts it: every setting is known, the file's users are users, the chart's token
    is an admin, and a token nobody knows is refused."""
    values = {
        "access": {
            "enabled": True,
            "tokenFile": {"existingSecret": "kernel-users"},
            "adminUsers": ["ops"],
            "quotas": {"maxKernelsPerUser": 2, "maxMemoryPerUser": "8Gi"},
        }
    }
    rendered = render(helm, helm_env, values, tmp_path)
    users = {"alice-token-0123456789": {"name": "alice", "groups": ["team-a"]}}
    data = {"users.json": base64.b64encode(json.dumps(users).encode()).decode()}
    # The Secret the release references, as the cluster would hold it.
    rendered.docs.append({"kind": "Secret", "metadata": {"name": "kernel-users"}, "data": data})
    token = base64.b64decode(rendered.one("Secret", f"{FULLNAME}-token")["data"]["token"]).decode()
    # The pod's absolute path of the token file, under tmp_path as chart_server lays it out.
    config = rendered.one("ConfigMap", FULLNAME)["data"]
    path = load_config(rendered).KernelAccess.token_file
    source = config["jupyter_server_config.py"]
    config["jupyter_server_config.py"] = source.replace(path, f"{tmp_path}/root{path}")
    with chart_server(rendered, tmp_path) as server:
        log = server.log()
        assert "not recognized" not in log and "Traceback" not in log, log
        assert "provisioners.access" in log, log
        for who in ("alice-token-0123456789", token):
            status, body = http_get(server.base + "api/kernels", who)
            assert status == 200, (who, status, body)
            assert json.loads(body) == []
        assert http_get(server.base + "api/kernels", "nobody-knows-this")[0] == 403
        assert http_get(server.base + "api/kernels")[0] == 403
        assert token not in server.log() and "alice-token-0123456789" not in server.log()


def test_rendered_hub_config_resolves_users_through_a_real_hub(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """The chart's access.hub values against JupyterHub 6: a user's token with the
    service's scope is that user, the service's api_token (from its Secret) reads their
    groups, access.adminUsers / adminGroups make admins, and a Hub token without the
    scope is refused."""
    with Hub(tmp_path / "hub", "http://127.0.0.1:9/") as hub:
        values = {
            "access": {
                "enabled": True,
                "hub": {"apiUrl": hub.api_url, "apiTokenSecret": {"name": "hub-service"}},
                "adminGroups": [GROUP],  # alice is in it; bob is not
            }
        }
        rendered = render(helm, helm_env, values, tmp_path)
        env = env_of(rendered)["JUPYTERHUB_API_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert env == {"name": "hub-service", "key": "token"}
        secret_env = {"JUPYTERHUB_API_TOKEN": hub.service_token}
        tokens = {user: hub.token(user, [SERVICE_SCOPE]) for user in ("alice", "bob")}
        no_scope = hub.token("bob", ["read:users:name!user=bob"])
        with chart_server(rendered, tmp_path, secret_env) as server:
            for user, token in tokens.items():
                status, body = http_get(server.base + "api/me", token)
                assert status == 200, (user, status, body)
                assert json.loads(body)["identity"]["username"] == user
            # An admin (by the Hub group) may use the whole API; a user only kernels.
            assert http_get(server.base + "api/contents", tokens["alice"])[0] == 200
            assert http_get(server.base + "api/contents", tokens["bob"])[0] == 403
            assert http_get(server.base + "api/kernels", tokens["bob"])[0] == 200
            assert http_get(server.base + "api/kernels", no_scope)[0] == 403
            log = server.log()
            assert "not recognized" not in log and "Traceback" not in log, log
            assert hub.service_token not in log and tokens["bob"] not in log

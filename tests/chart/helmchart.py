"""The Helm chart as the chart tests see it: its values, the scenarios they render,
``helm`` runs, a render's manifests (:class:`Rendered`) and a real Jupyter Server run
with a render's configuration (:func:`chart_server`).

Nothing here imports the ``provisioners`` package.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from traitlets.config import Config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cluster-provisioners"
RELEASE = "kernels"
NAMESPACE = "jupyter"
FULLNAME = f"{RELEASE}-cluster-provisioners"
# Oldest Kubernetes minor the chart supports and a current one (kubectl from the layer is 1.33).
K8S_VERSIONS = ("1.30.0", "1.33.0")

KERNEL_POD_LABELS = {
    "app.kubernetes.io/managed-by": "cluster-provisioners",
    "app.kubernetes.io/component": "kernel",
}
# What the provisioner does (tests/kubernetes/test_rbac.py records it on the API double).
KERNEL_NAMESPACE_RULES = {
    "pods": {"list", "watch", "create", "delete"},
    "pods/exec": {"create", "get"},
    "pods/log": {"get"},
    "secrets": {"create", "delete", "list"},
    "events": {"watch"},
}
PORT_FORWARD_RULES = {"pods/portforward": {"create", "get"}}
#: Only when a kernelspec keeps a warm pool: a claim relabels the pod and its Secret.
POOL_RULES = {"pods": {"patch"}, "secrets": {"patch"}}
#: In the release namespace: is a kernel's server pod still there?
OWNER_RULES = {"pods": {"get"}}
DEFAULT_KERNEL_NAMESPACE = f"{NAMESPACE}-{RELEASE}-kernels"
CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding", "Namespace"}


def kernelspec_values(display_name: str, image: str, **config: Any) -> dict[str, Any]:
    return {
        "display_name": display_name,
        "language": "python",
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "cluster-kubernetes-provisioner",
                "config": {"image": image, **config},
            }
        },
    }


# Value sets rendered by the tests: the defaults and the main non-default configurations.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"},
            "hosts": [
                {
                    "host": "kernels.example.org",
                    "paths": [{"path": "/kernels", "pathType": "Prefix"}],
                }
            ],
            "tls": [{"secretName": "kernels-tls", "hosts": ["kernels.example.org"]}],
        },
        "server": {"baseUrl": "/kernels", "trustXheaders": True},
    },
    "namespaces": {
        "rbac": {"secretNames": ["team-a-ssh-password"]},
        "kernels": {
            "namespace": "kernels",
            # "kernels" again on purpose: it must not produce a second Role.
            "extraNamespaces": ["team-a", "team-b", "kernels"],
            "portForward": False,
            "kernelspecs": {
                "team-a": kernelspec_values(
                    "Team A", "registry.example.org/team-a/kernel:1", namespace="team-a"
                )
            },
        },
    },
    "prepuller": {
        "prePuller": {"enabled": True, "extraImages": ["registry.example.org/tools/kernel-r:4"]},
        "kernels": {
            "portForward": True,
            "kernelspecs": {
                "python3-gpu": kernelspec_values(
                    "Python 3 (GPU)", "registry.example.org/kernel-gpu:1"
                )
            },
        },
    },
    "pools": {
        "kernels": {
            "kernelspecs": {
                # Its own pool_size, overridden by kernels.pools.sizes (0: no pool).
                "gpu": kernelspec_values("GPU", "registry.example.org/kernel-gpu:1", pool_size=5),
                # Its own pool_size, not named in kernels.pools.sizes: kept.
                "small": kernelspec_values("Small", "registry.example.org/kernel:1", pool_size=2),
                "analysis": kernelspec_values("Analysis", "registry.example.org/kernel:1"),
            },
            "pools": {"sizes": {"python3": 3, "gpu": 0, "analysis": 1}, "maxTotal": 6},
        },
    },
    # Many users (issue 22): a Hub, a token file, admins and quotas, each Secret referenced.
    "access": {
        "access": {
            "enabled": True,
            "hub": {
                "apiUrl": "http://hub.jhub.svc.cluster.local:8081/hub/api",
                "apiTokenSecret": {"name": "hub", "key": "hub.services.gateway.apiToken"},
            },
            "tokenFile": {"existingSecret": "kernel-users"},
            "adminGroups": ["platform"],
            "quotas": {"maxKernelsPerUser": 3, "maxCpuPerUser": 4, "maxMemoryPerUser": "16Gi"},
        },
    },
    "existing-secret": {
        "auth": {"existingSecret": "site-jupyter-token", "existingSecretKey": "jupyter-token"},
        "serviceAccount": {"create": False, "name": "jupyter-kernels"},
    },
}


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def find_helm() -> str | None:
    """The helm binary to use, or None."""
    if os.environ.get("HELM"):
        return shutil.which(os.environ["HELM"]) or None
    caches = [
        os.environ.get("CLUSTER_PROVISIONERS_CACHE"),
        str(Path.home() / ".cache/cluster-provisioners"),
    ]
    for cache_dir in caches:
        if cache_dir and os.access(Path(cache_dir) / "bin/helm", os.X_OK):
            return str(Path(cache_dir) / "bin/helm")
    return None


def run_helm(helm: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm-like merge of values (maps merge, everything else replaces; None deletes)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@cache
def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def effective_values(scenario: str) -> dict[str, Any]:
    return deep_merge(default_values(), SCENARIOS[scenario])


def kernel_namespaces(values: dict[str, Any]) -> list[str]:
    first = values["kernels"]["namespace"] or DEFAULT_KERNEL_NAMESPACE
    out = [first]
    for ns in values["kernels"]["extraNamespaces"]:
        if ns not in out:
            out.append(ns)
    return out


class Rendered:
    """The manifests of one `helm template` run."""

    def __init__(self, scenario: str, docs: list[dict[str, Any]]):
        self.scenario = scenario
        self.values = effective_values(scenario)
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{self.scenario}: expected one {kind} {name or ''}, got {len(found)}"
        )
        return found[0]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for doc in self.docs:
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
                yield where, doc["spec"]["template"]["spec"]
            elif doc["kind"] == "Pod":
                yield where, doc["spec"]

    @property
    def server_pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]

    @property
    def server_container(self) -> dict[str, Any]:
        (container,) = [c for c in self.server_pod["spec"]["containers"] if c["name"] == "server"]
        return container

    def configmap_file(self, key: str) -> str:
        return self.one("ConfigMap", FULLNAME)["data"][key]


def load_config(rendered: Rendered) -> Config:
    source = rendered.configmap_file("jupyter_server_config.py")
    config = Config()
    code = compile(source, "jupyter_server_config.py", "exec")
    exec(code, {"get_config": lambda: config})
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"token {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def lay_out_pod(rendered: Rendered, root: Path) -> dict[str, str]:
    """Write the server container's ConfigMap and Secret volumes under ``root`` as they are
    mounted in the pod; return its literal environment with absolute paths under ``root``."""

    def local(path: str) -> Path:
        return root / path.lstrip("/")

    container = rendered.server_container
    volumes = {v["name"]: v for v in rendered.server_pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source = volume["configMap"]
            data = rendered.one("ConfigMap", source["name"])["data"]
            files = {i["path"]: data[i["key"]].encode() for i in source["items"]}
        elif "secret" in volume:
            source = volume["secret"]
            data = rendered.one("Secret", source["secretName"])["data"]
            files = {i["path"]: base64.b64decode(data[i["key"]]) for i in source["items"]}
        else:  # emptyDir
            files = {}
        local(mount["mountPath"]).mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            target = local(mount["mountPath"]) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    env = {}
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
            env[item["name"]] = str(local(value)) if value.startswith("/") else value
    return env


class ChartServer:
    """A real ``jupyter server`` run with the chart's config, as the pod runs it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], base: str, env: dict[str, str], log_path: Path
    ) -> None:
        self.proc = proc
        self.base = base
        self.env = env
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def chart_server(
    rendered: Rendered, tmp_path: Path, secret_env: dict[str, str] | None = None
) -> Iterator[ChartServer]:
    """Lay the pod's files out under ``tmp_path``, start the server on a loopback port,
    wait until it answers, and terminate it on exit (if the test has not stopped it).
    ``secret_env``: the values of the container's variables from Secrets (valueFrom)."""
    root = tmp_path / "root"
    pod_env = lay_out_pod(rendered, root)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    run_env.update(pod_env)
    run_env.update(secret_env or {})
    home = Path(pod_env.get("HOME", str(root / "tmp")))
    run_env.update(
        JUPYTER_CONFIG_DIR=str(home / ".jupyter"),
        JUPYTER_DATA_DIR=str(home / ".local/share/jupyter"),
        JUPYTER_RUNTIME_DIR=pod_env.get("JUPYTER_RUNTIME_DIR", str(home / "runtime")),
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}{load_config(rendered).ServerApp.base_url}"
    # Loopback only, and a root dir under tmp_path: the command line overrides the config.
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root / 'tmp'}",
    ]
    if os.geteuid() == 0:  # the pod runs as uid 1000; this machine may not
        argv.append("--allow-root")
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    server = ChartServer(proc, base, pod_env, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "server exited:\n" + server.log()
            try:
                if http_get(base + "api")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer:\n" + server.log()
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

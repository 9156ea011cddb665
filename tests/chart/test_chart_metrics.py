"""The chart's metrics objects: an optional ServiceMonitor that scrapes the server's
``/metrics`` with its token, and an optional Grafana dashboard ConfigMap; both off by
default. (That the dashboard's queries name metrics the server serves is checked against a
real server in tests/ux/test_metrics.py.)"""

from __future__ import annotations

import base64
import json
import urllib.request
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
    run_helm,
)

pytestmark = pytest.mark.helm

ENABLED = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
]


def render(helm: str, helm_env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    proc = run_helm(
        helm, helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_metrics_objects_are_off_by_default(helm: str, helm_env: dict[str, str]) -> None:
    docs = render(helm, helm_env)
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert not [d for d in docs if d["metadata"]["name"] == f"{FULLNAME}-dashboard"]


@pytest.mark.parametrize("existing_secret", [False, True])
def test_service_monitor_scrapes_the_server_with_its_token(
    helm: str, helm_env: dict[str, str], existing_secret: bool
) -> None:
    args = [*ENABLED, "--set", "server.baseUrl=/kernels"]
    args += ["--set", "metrics.serviceMonitor.labels.release=prometheus"]
    if existing_secret:
        args += ["--set", "auth.existingSecret=site-token", "--set", "auth.existingSecretKey=t"]
    docs = render(helm, helm_env, *args)
    monitor = one(docs, "ServiceMonitor", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # it selects the server's Service, and no other
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
    ]
    assert [s["metadata"]["name"] for s in services] == [FULLNAME]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in services[0]["spec"]["ports"]]
    assert endpoint["path"] == "/kernels/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "10s")
    # the token from its Secret: the one the server reads
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    if existing_secret:
        assert credentials == {"name": "site-token", "key": "t"}
    else:
        secret = one(docs, "Secret", credentials["name"])
        assert credentials["key"] in secret["data"]
    deployment = one(docs, "Deployment", FULLNAME)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == credentials["name"]
    assert credentials["key"] in [i["key"] for i in volumes["token"]["secret"]["items"]]


def test_dashboard_configmap_holds_the_dashboard(helm: str, helm_env: dict[str, str]) -> None:
    docs = render(helm, helm_env, *ENABLED)
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["cluster-provisioners.json"])
    assert shipped == json.loads((CHART / "dashboards" / "cluster-provisioners.json").read_text())
    panels = shipped["panels"]
    assert panels and all(t["expr"] for p in panels for t in p["targets"])
    assert len({p["id"] for p in panels}) == len(panels)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("metrics.serviceMonitor.interval=30 seconds", "interval"),
        ("metrics.serviceMonitor.enabeld=true", "enabeld"),
        ("metrics.dashboard.enabled=sometimes", "enabled"),
    ],
)
def test_schema_rejects_bad_metrics_values(
    helm: str, helm_env: dict[str, str], setting: str, named: str
) -> None:
    proc = run_helm(helm, helm_env, "template", RELEASE, str(CHART), "--set", setting)
    assert proc.returncode != 0, f"helm template accepted {setting}"
    assert "schema" in proc.stderr and named in proc.stderr, proc.stderr


def test_lint_with_metrics(helm: str, helm_env: dict[str, str]) -> None:
    proc = run_helm(helm, helm_env, "lint", "--strict", str(CHART), *ENABLED)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_server_answers_the_service_monitors_scrape(
    helm: str, helm_env: dict[str, str], values_dir: Path, tmp_path: Path
) -> None:
    """The chart's server, run with its rendered config, serves the monitor's path to the
    bearer token the monitor sends, and refuses it without."""
    docs = render(helm, helm_env, "-f", str(values_dir / "ingress.yaml"), *ENABLED)
    (endpoint,) = one(docs, "ServiceMonitor", FULLNAME)["spec"]["endpoints"]
    credentials = endpoint["authorization"]["credentials"]
    secret = one(docs, "Secret", credentials["name"])
    token = base64.b64decode(secret["data"][credentials["key"]]).decode()
    with chart_server(Rendered("ingress", docs), tmp_path) as server:
        url = server.base.split("/kernels/")[0] + endpoint["path"]
        assert url == server.base + "metrics"
        assert http_get(url)[0] == 403
        status, body = http_get(url, token)  # "token <t>", as the tests send it
        assert status == 200 and b"jupyter_server_info" in body, body[:300]
        # the chart's server extension (provisioners.persist) loads the provisioners at
        # start: their metrics are there before the first kernel
        assert b"# TYPE cluster_provisioners_live_kernels gauge" in body, server.log()
        bearer = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(bearer, timeout=10) as response:
            assert response.status == 200

"""Fixtures of the Helm chart tests: ``helm`` and its environment, the scenarios' values
and their renders (the helpers behind them: tests/chart/helmchart.py).

These tests look at rendered YAML only: they never import the ``provisioners`` package, so
they run (and must pass) even while the package itself is broken or half written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.chart.helmchart import (
    CHART,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Rendered,
    find_helm,
    run_helm,
    truthy,
)


@pytest.fixture(autouse=True)
def jupyter_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Replaces the suite-wide fixture of the same name, which imports ``provisioners``."""
    runtime = tmp_path_factory.mktemp("runtime")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    return runtime


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        reason = (
            "helm not found ($HELM, $CLUSTER_PROVISIONERS_CACHE/bin/helm, "
            "~/.cache/cluster-provisioners/bin/helm): run `bash .ci/lib/helm.sh` to install it"
        )
        if truthy(os.environ.get("CI")):
            pytest.fail(reason + " (CI is set, so a missing helm is a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for helm: private cache/config/data dirs, no cluster."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-kubeconfig"),
    )
    return env


@pytest.fixture(scope="session")
def values_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("values")
    for name, values in SCENARIOS.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(values))
    return directory


@pytest.fixture(scope="session")
def render(helm: str, helm_env: dict[str, str], values_dir: Path):
    """render(scenario) -> Rendered, cached for the session."""
    done: dict[str, Rendered] = {}

    def _render(scenario: str) -> Rendered:
        if scenario not in done:
            proc = run_helm(
                helm,
                helm_env,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "--kube-version",
                K8S_VERSIONS[-1],
                "-f",
                str(values_dir / f"{scenario}.yaml"),
            )
            assert proc.returncode == 0, f"helm template ({scenario}) failed:\n{proc.stderr}"
            docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            done[scenario] = Rendered(scenario, docs)
        return done[scenario]

    return _render


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> str:
    return request.param

"""Kubernetes starts in a real Jupyter Server's ``/metrics`` (issue 23, part 1): a start,
a missing image, an unschedulable pod and (on the API double) a refused pod creation, each
with its outcome, and the refusal counted as an API error."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import KUBERNETES_PROVISIONER, Kube, write_kernelspec
from tests.helpers.metrics import ENGINE_ERRORS, LIVE, START, labels, ours, scrape, start_labels
from tests.jupyter_server import JupyterServer

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]


@pytest.fixture(autouse=True)
def _no_kube_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server subprocess must reach the same API as the test (no in-cluster config)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_kubernetes_outcomes_and_api_errors_in_metrics(kube: Kube, tmp_path: Path) -> None:
    missing = f"cluster-provisioners.invalid/no-such-image-{uuid.uuid4().hex[:6]}:0"
    specs = {
        "pod": kube.config(),
        "no-image": kube.config(image=missing, image_pull_policy="IfNotPresent"),
        "unschedulable": kube.config(gpus=1, gpu_resource="example.com/no-such-device"),
        "forbidden": kube.config(),
    }
    with JupyterServer(tmp_path) as server:
        for name, config in specs.items():
            write_kernelspec(server.kernels, name, KUBERNETES_PROVISIONER, config, **kube.spec())
        status, kernel = server.request("POST", "api/kernels", {"name": "pod"})
        assert status == 201, (kernel, server.log())
        for name in ("no-image", "unschedulable"):
            status, reply = server.request("POST", "api/kernels", {"name": name})
            assert status == 500, reply
        if kube.forbid is not None:  # only the API double can be told to refuse
            denial = kube.forbid("create", "pods")
            try:
                status, reply = server.request("POST", "api/kernels", {"name": "forbidden"})
            finally:
                denial.lift()
            assert status == 500 and "Forbidden" in str(reply), reply
        samples = scrape(server)
        assert server.request("DELETE", f"api/kernels/{kernel['id']}")[0] == 204
        after = scrape(server)
    expected = {
        start_labels("kubernetes", "pod", "ok"): 1.0,
        start_labels("kubernetes", "no-image", "image"): 1.0,
        start_labels("kubernetes", "unschedulable", "scheduling"): 1.0,
    }
    if kube.forbid is not None:
        expected[start_labels("kubernetes", "forbidden", "forbidden")] = 1.0
        errors = ours(samples, ENGINE_ERRORS)
        assert errors.get(labels(target="kubernetes", kind="forbidden")) == 1.0, errors
    assert ours(samples, START) == expected, server.log()
    assert ours(samples, LIVE) == {labels(target="kubernetes"): 1.0}
    assert ours(after, LIVE) == {labels(target="kubernetes"): 0.0}

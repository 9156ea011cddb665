"""A failed Kubernetes start through a real Jupyter Server (issue 11, part 3): the
scheduler's and the API's own words reach ``POST /api/kernels`` and ``POST /api/sessions``,
and the server still shuts down cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import KUBERNETES_PROVISIONER, Kube, write_kernelspec
from tests.jupyter_server import JupyterServer


def _both_paths(server: JupyterServer, name: str) -> list[tuple[int, object]]:
    kernels = server.request("POST", "api/kernels", {"name": name})
    session = {"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": name}}
    return [kernels, server.request("POST", "api/sessions", session)]


def test_unschedulable_and_forbidden_starts_are_explained(kube: Kube, tmp_path: Path) -> None:
    with JupyterServer(tmp_path) as server:
        unschedulable = kube.config(gpus=1, gpu_resource="example.com/no-such-device")
        write_kernelspec(
            server.kernels, "unschedulable", KUBERNETES_PROVISIONER, unschedulable, **kube.spec()
        )
        write_kernelspec(
            server.kernels,
            "forbidden",
            KUBERNETES_PROVISIONER,
            kube.config(connection_mode="port-forward", launch_timeout=20.0),
            **kube.spec(),
        )
        for status, reply in _both_paths(server, "unschedulable"):
            assert status == 500, reply
            assert isinstance(reply, dict), reply
            assert "Unschedulable" in reply["message"], reply
            assert "example.com/no-such-device" in reply["message"], reply
        if kube.forbid is not None:  # only the API double can be told to refuse
            denial = kube.forbid("create", "pods")
            try:
                replies = _both_paths(server, "forbidden")
            finally:
                denial.lift()
            for status, reply in replies:
                assert status == 500, reply
                assert isinstance(reply, dict), reply
                assert "Forbidden (check the RBAC rules)" in reply["message"], reply
        status, reply = server.request("POST", "api/shutdown")
        assert status in (200, 0), reply
        assert server.wait_exit(60) is not None, server.log()
        assert "Kernel does not exist" not in server.log()


@pytest.fixture(autouse=True)
def _no_kube_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server subprocess must reach the same API as the test (no in-cluster config)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

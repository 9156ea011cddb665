"""The chart's server configuration, run here with a Docker kernelspec, serves kernels.

The chart is rendered with ``helm template`` and a values override whose only kernelspec
selects ``cluster-docker-provisioner`` on the offline test image. The ConfigMap, Secret and
environment of the server container are laid out under a temporary "root" as the pod would
see them, and a real ``jupyter server`` (this Python's, outside any container) is started
with them on 127.0.0.1. A kernel is then started over REST, driven over its websocket by a
real websocket client speaking the Jupyter message protocol, and deleted; the server is
stopped with SIGTERM. No container of ours may remain at any of those points.

Needs helm (see tests/chart/helmchart.py) and a Docker engine with the test image; without them the
test skips, except under CI where it fails.

Like the rest of tests/chart this module does not import the ``provisioners`` package: the
server process loads it through its entry point.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.provisioning import KernelProvisionerFactory
from websockets.asyncio.client import connect

from tests.chart import helmchart as chart
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE
from tests.jupyter_server import Output, execute_request, http, ws_request

pytestmark = [pytest.mark.docker, pytest.mark.helm]

DOCKER = "cluster-docker-provisioner"
SPEC_NAME = "python3-docker"
LABEL_KERNEL_ID = "cluster-provisioners.kernel-id"
# An extra container label (the provisioner's ``labels`` option) unique to one test run:
# it finds every container the server started, whatever its kernel id.
LABEL_RUN = "test.cluster-provisioners/run"


def _docker_values(run_id: str) -> dict[str, Any]:
    """Values replacing the chart's kernelspecs by one Docker kernelspec."""
    stanza: dict[str, Any] = {"provisioner_name": DOCKER}
    stanza["config"] = {
        "image": KERNEL_TEST_IMAGE,
        "pull_policy": "never",  # the test image is built locally, never pulled
        "sweep_on_start": False,  # leave other runs' containers alone
        "labels": {LABEL_RUN: run_id},
    }
    return {
        "server": {"defaultKernelName": SPEC_NAME},
        "kernels": {
            "kernelspecs": {
                "python3": None,
                SPEC_NAME: {
                    "display_name": "Python 3 (Docker)",
                    "language": "python",
                    "argv": list(CONTAINER_ARGV),
                    "metadata": {"kernel_provisioner": stanza},
                },
            }
        },
    }


class _Rendered(chart.Rendered):
    """test_chart's view of one render, for values that are not one of its scenarios."""

    def __init__(self, values: dict[str, Any], docs: list[dict[str, Any]]):
        self.scenario = "docker-server"
        self.values = values
        self.docs = docs


def _render(
    helm: str, helm_env: dict[str, str], override: dict[str, Any], where: Path
) -> _Rendered:
    values_file = where / "values.yaml"
    values_file.write_text(yaml.safe_dump(override))
    proc = chart.run_helm(
        helm,
        helm_env,
        "template",
        chart.RELEASE,
        str(chart.CHART),
        "--namespace",
        chart.NAMESPACE,
        "--kube-version",
        chart.K8S_VERSIONS[-1],
        "-f",
        str(values_file),
    )
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _Rendered(chart.deep_merge(chart.default_values(), override), docs)


def _containers(client: docker.DockerClient, label: str, value: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{label}={value}"})


async def _run_on_kernel(ws_url: str, token: str) -> list[Output]:
    session = uuid.uuid4().hex
    async with connect(
        f"{ws_url}?session_id={session}",
        additional_headers={"Authorization": f"token {token}"},
        max_size=None,
        open_timeout=30,
    ) as ws:
        return [
            await ws_request(ws, execute_request(session, "print(sum(range(10)))")),
            await ws_request(
                ws, execute_request(session, "import socket; print(socket.gethostname())")
            ),
        ]


def test_chart_server_serves_a_docker_kernel(
    helm: str, helm_env: dict[str, str], docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    run_id = uuid.uuid4().hex
    rendered = _render(helm, helm_env, _docker_values(run_id), tmp_path)
    token = base64.b64decode(rendered.one("Secret")["data"]["token"]).decode()
    kernel_ids: list[str] = []

    def ours() -> list[Any]:
        return _containers(docker_client, LABEL_RUN, run_id)

    try:
        with chart.chart_server(rendered, tmp_path) as server:
            _serve_a_docker_kernel(server, token, run_id, docker_client, kernel_ids, ours)
    finally:
        for leftover in ours():  # never leak containers, even when an assertion failed
            leftover.remove(force=True, v=True)


def _serve_a_docker_kernel(
    server: chart.ChartServer,
    token: str,
    run_id: str,
    docker_client: docker.DockerClient,
    kernel_ids: list[str],
    ours: Any,
) -> None:
    """The checks against the running server (see the test above)."""
    base, proc, server_log = server.base, server.proc, server.log
    pod_env = server.env
    for name in ("JUPYTER_CONFIG_PATH", "JUPYTER_PATH", "JUPYTER_TOKEN_FILE"):
        assert name in pod_env, f"the chart no longer sets {name}"
    assert (Path(pod_env["JUPYTER_PATH"]) / "kernels" / SPEC_NAME / "kernel.json").is_file()
    assert Path(pod_env["JUPYTER_TOKEN_FILE"]).read_text() == token
    assert "JUPYTER_TOKEN" not in pod_env
    # The Docker kernelspec is served, with its provisioner.
    status, body = chart.http_get(base + "api/kernelspecs", token)
    assert status == 200, body
    listing = json.loads(body)
    assert sorted(listing["kernelspecs"]) == [SPEC_NAME], listing
    assert listing["default"] == SPEC_NAME
    spec = listing["kernelspecs"][SPEC_NAME]["spec"]
    assert spec["argv"] == CONTAINER_ARGV
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == DOCKER
    assert spec["metadata"]["kernel_provisioner"]["config"]["image"] == KERNEL_TEST_IMAGE

    # A kernel starts, in a container labelled with its id.
    status, body = http("POST", base + "api/kernels", token, {"name": SPEC_NAME})
    assert status == 201, f"{status} {body!r}\n{server_log()}"
    kernel = json.loads(body)
    kernel_id = kernel["id"]
    kernel_ids.append(kernel_id)
    assert kernel["name"] == SPEC_NAME
    (container,) = _containers(docker_client, LABEL_KERNEL_ID, kernel_id)
    container.reload()
    assert container.status == "running", container.status
    assert container.labels[LABEL_RUN] == run_id
    assert container.image.id == docker_client.images.get(KERNEL_TEST_IMAGE).id
    hostname = container.attrs["Config"]["Hostname"]

    # A real websocket client runs code on it.
    ws_url = base.replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"
    arithmetic, host = asyncio.run(_run_on_kernel(ws_url, token))
    for result in (arithmetic, host):
        assert result.status == "ok", result
        assert not result.errors, result
    assert arithmetic.stdout == "45\n", arithmetic
    assert host.stdout == f"{hostname}\n", (host, hostname)

    # Deleting the kernel removes its container.
    status, body = http("DELETE", base + f"api/kernels/{kernel_id}", token)
    assert status == 204, f"{status} {body!r}\n{server_log()}"
    left = _containers(docker_client, LABEL_KERNEL_ID, kernel_id)
    assert not left, f"container of deleted kernel {kernel_id} remains: {left}"
    assert chart.http_get(base + f"api/kernels/{kernel_id}", token)[0] == 404

    # A kernel still running when the server gets SIGTERM is detached, not shut down
    # (kernels.persist, the chart's default): its container runs on for the next server.
    status, body = http("POST", base + "api/kernels", token, {"name": SPEC_NAME})
    assert status == 201, f"{status} {body!r}\n{server_log()}"
    kernel_ids.append(json.loads(body)["id"])
    assert _containers(docker_client, LABEL_KERNEL_ID, kernel_ids[-1])
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("server did not exit within 60 s of SIGTERM:\n" + server_log())
    assert code == 0, f"server exited with {code}:\n{server_log()}"
    assert "Detached 1 kernel(s)" in server_log(), server_log()
    (kept,) = _containers(docker_client, LABEL_KERNEL_ID, kernel_ids[-1])
    assert kept.status == "running", kept.status
    left = [c for c in ours() if c.id != kept.id]
    assert not left, f"the stopped server left containers {[c.name for c in left]}"

    text = server_log()
    assert token not in text, "the token appears in the server's output"
    assert "not recognized" not in text, f"config the server ignores:\n{text}"


def test_chart_kernelspec_selects_its_provisioner(
    helm: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """A kernelspec rendered by the chart selects the named provisioner in jupyter_client
    (which silently falls back to its local-provisioner on a misspelt key)."""
    rendered = _render(helm, helm_env, _docker_values("unused"), tmp_path)
    spec_json = json.loads(rendered.configmap_file(f"kernelspec.{SPEC_NAME}.json"))
    selected = KernelProvisionerFactory.instance()._get_provisioner_config(KernelSpec(**spec_json))
    assert selected["provisioner_name"] == DOCKER, selected

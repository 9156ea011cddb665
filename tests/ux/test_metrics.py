"""Prometheus metrics scraped from a real Jupyter Server's ``/metrics`` after known starts,
failures and pool claims (issue 23, part 1): exact counts and labels."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect

from provisioners import metrics
from provisioners.exceptions import (
    EngineUnavailableError,
    KernelStartError,
    PortsExhaustedError,
    ProvisionerConfigError,
)
from provisioners.k8s.client import KubeApiError
from tests.helpers import (
    CONTAINER_ARGV,
    DOCKER_PROVISIONER,
    KERNEL_TEST_IMAGE,
    LOCAL_ARGV,
    LOCAL_PROVISIONER,
    async_wait_for,
    write_kernelspec,
)
from tests.helpers.metrics import (
    LIVE,
    START,
    SUM,
    labels,
    metrics_text,
    ours,
    scrape,
    start_labels,
)
from tests.jupyter_server import REPO, JupyterServer, http, ws_execute

#: A kernel command that never listens: its start runs into launch_timeout.
SILENT_ARGV = ["python3", "-c", "import time, sys; time.sleep(60)", "{connection_file}"]
#: A Docker daemon address where none listens.
DEAD_DAEMON = "unix:///nonexistent/docker.sock"
DASHBOARD = REPO / "charts" / "cluster-provisioners" / "dashboards" / "cluster-provisioners.json"
LOCAL_SPECS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "good": ({}, LOCAL_ARGV),
    "pooled": ({"pool_size": 1, "inherit_server_env": False}, LOCAL_ARGV),
    "bad-key": ({"no_such_key": 1}, LOCAL_ARGV),
    "no-ports": ({"port_range": "25000-25003"}, LOCAL_ARGV),
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[JupyterServer]:
    with JupyterServer(tmp_path) as running:
        for name, (config, argv) in LOCAL_SPECS.items():
            write_kernelspec(running.kernels, name, LOCAL_PROVISIONER, config, argv=argv)
        (tmp_path / "notebooks").mkdir()
        yield running


async def post_kernel(server: JupyterServer, body: dict[str, Any], expect: int) -> Any:
    status, reply = await asyncio.to_thread(server.request, "POST", "api/kernels", body)
    assert status == expect, f"POST {body}: {status} {reply!r}\n{server.log()}"
    return reply


async def warm_ready(server: JupyterServer) -> None:
    """Wait until the scraped pool gauge shows pooled's warm kernel ready."""

    def ready() -> bool:
        pool = ours(scrape(server), "cluster_provisioners_pool_kernels")
        return pool.get(labels(kernelspec="pooled", state="ready")) == 1.0

    await async_wait_for(lambda: asyncio.to_thread(ready), 60, "a warm kernel of 'pooled'")


async def test_metrics_count_starts_failures_and_claims(server: JupyterServer) -> None:
    # Jupyter Server asks for its token on /metrics (authenticate_prometheus)
    assert http("GET", f"{server.base}metrics")[0] == 403
    before = scrape(server)
    assert ours(before, START) == {} and ours(before, LIVE) == {}, before

    good = [await post_kernel(server, {"name": "good"}, 201) for _ in range(2)]
    await post_kernel(server, {"name": "bad-key"}, 500)  # refused config
    await post_kernel(server, {"name": "no-ports"}, 503)  # no port left in its range
    # a kernelspec with a pool: its first start makes the pool (a miss: none ready yet),
    # a start in another working directory is cold, the next start claims
    await post_kernel(server, {"name": "pooled"}, 201)
    await warm_ready(server)
    await post_kernel(server, {"name": "pooled", "path": "notebooks"}, 201)
    claimed = await post_kernel(server, {"name": "pooled"}, 201)
    assert f"Kernel {claimed['id']} (local): claimed: warm kernel pool-" in server.log()
    session = uuid.uuid4().hex
    async with connect(
        server.ws_url(claimed["id"], session), additional_headers=server.ws_headers()
    ) as ws:
        assert (await ws_execute(ws, session, "print(6 * 7)"))["stdout"] == "42\n"
    await warm_ready(server)  # refilled after the claim

    samples = scrape(server)
    assert ours(samples, START) == {
        start_labels("local", "good", "ok"): 2.0,
        start_labels("local", "bad-key", "config"): 1.0,
        start_labels("local", "no-ports", "scheduling"): 1.0,
        start_labels("local", "pooled", "ok"): 2.0,
        start_labels("local", "pooled", "ok", "pooled"): 1.0,
    }, server.log()
    claim_seconds = samples[(SUM, start_labels("local", "pooled", "ok", "pooled"))]
    assert 0 < claim_seconds < 2.0, claim_seconds
    assert samples[(SUM, start_labels("local", "bad-key", "config"))] == 0.0  # refused at once
    assert ours(samples, LIVE) == {labels(target="local"): 5.0}
    assert ours(samples, "cluster_provisioners_pool_claims_total") == {
        labels(kernelspec="pooled"): 1.0
    }
    assert ours(samples, "cluster_provisioners_pool_misses_total") == {
        labels(kernelspec="pooled", reason="empty"): 1.0,
        labels(kernelspec="pooled", reason="cwd"): 1.0,
    }
    assert ours(samples, "cluster_provisioners_pool_kernels") == {
        labels(kernelspec="pooled", state="ready"): 1.0,
        labels(kernelspec="pooled", state="starting"): 0.0,
    }
    assert ours(samples, "cluster_provisioners_pool_size") == {labels(kernelspec="pooled"): 1.0}
    assert ours(samples, "cluster_provisioners_engine_errors_total") == {}

    # a shutdown: the kernel no longer counts as live; a restart keeps it counted
    for kernel in good:
        status, reply = server.request("POST", f"api/kernels/{kernel['id']}/restart")
        assert status == 200, reply
    assert ours(scrape(server), LIVE) == {labels(target="local"): 5.0}
    for kernel in good:
        assert server.request("DELETE", f"api/kernels/{kernel['id']}")[0] == 204
    after = scrape(server)
    assert ours(after, LIVE) == {labels(target="local"): 3.0}
    assert ours(after, START) == ours(samples, START)  # restarts are not starts

    # every metric the chart's Grafana dashboard queries is one the server serves
    served = set(re.findall(r"^# TYPE (cluster_provisioners_\w+) ", metrics_text(server), re.M))
    queried = set(re.findall(r"cluster_provisioners_\w+", DASHBOARD.read_text()))
    queried = {re.sub(r"_(bucket|count|sum)$", "", name) for name in queried}
    assert queried and queried <= served, queried - served


@pytest.mark.docker
def test_docker_starts_a_missing_image_a_timeout_and_a_daemon_down(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    image = f"cluster-provisioners-test/missing-{uuid.uuid4().hex[:8]}:none"
    config = {"image": KERNEL_TEST_IMAGE, "pull_policy": "never", "sweep_on_start": False}
    specs = {
        "box": (config, CONTAINER_ARGV),
        "no-image": ({**config, "image": image}, CONTAINER_ARGV),
        "silent": ({**config, "launch_timeout": 2.0}, SILENT_ARGV),
        # no daemon there: the start fails, or falls back to a local kernel
        "down": ({**config, "docker_host": DEAD_DAEMON, "fallback": "none"}, LOCAL_ARGV),
        "fallback": ({**config, "docker_host": DEAD_DAEMON, "fallback": "local"}, LOCAL_ARGV),
    }
    with JupyterServer(tmp_path) as server:
        for name, (spec_config, argv) in specs.items():
            write_kernelspec(server.kernels, name, DOCKER_PROVISIONER, spec_config, argv=argv)
        status, kernel = server.request("POST", "api/kernels", {"name": "box"})
        assert status == 201, kernel
        status, reply = server.request("POST", "api/kernels", {"name": "no-image"})
        assert status == 500 and image in str(reply), reply
        status, reply = server.request("POST", "api/kernels", {"name": "silent"})
        assert status == 500 and "launch_timeout" in str(reply), reply
        status, reply = server.request("POST", "api/kernels", {"name": "down"})
        assert status == 503 and "unreachable" in str(reply), reply
        status, local = server.request("POST", "api/kernels", {"name": "fallback"})
        assert status == 201, local
        samples = scrape(server)
        assert server.request("DELETE", f"api/kernels/{kernel['id']}")[0] == 204
        after = scrape(server)
    assert ours(samples, START) == {
        start_labels("docker", "box", "ok"): 1.0,
        start_labels("docker", "no-image", "image"): 1.0,
        start_labels("docker", "silent", "timeout"): 1.0,
        start_labels("docker", "down", "engine_down"): 1.0,
        start_labels("docker", "fallback", "ok"): 1.0,
    }
    assert 2.0 <= samples[(SUM, start_labels("docker", "silent", "timeout"))] < 15.0
    # the daemon answered 404 for the image; the dead one twice not at all
    assert ours(samples, "cluster_provisioners_engine_errors_total") == {
        labels(target="docker", kind="not_found"): 1.0,
        labels(target="docker", kind="unreachable"): 2.0,
    }
    # the fallback kernel runs locally
    assert ours(samples, LIVE) == {labels(target="docker"): 1.0, labels(target="local"): 1.0}
    assert ours(after, LIVE) == {labels(target="docker"): 0.0, labels(target="local"): 1.0}


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ProvisionerConfigError("unknown key"), "config"),
        (EngineUnavailableError("Docker daemon at x is unreachable"), "engine_down"),
        (PortsExhaustedError("no free ports"), "scheduling"),
        (asyncio.TimeoutError(), "timeout"),
        (
            KernelStartError(
                "kernel pod ns/p failed to start: container 'kernel': ErrImagePull: x"
            ),
            "image",
        ),
        (
            KernelStartError("kernel pod ns/p failed to start: Unschedulable: 0/1 nodes"),
            "scheduling",
        ),
        (KernelStartError("The kernel exited with code 3 while starting."), "other"),
    ],
)
def test_failure_reasons_of_the_engines_errors(error: BaseException, outcome: str) -> None:
    assert metrics.failure_reason(error) == outcome


def test_a_kubernetes_refusal_is_forbidden_and_an_unreachable_api_engine_down() -> None:
    for status, outcome in ((403, "forbidden"), (0, "engine_down"), (500, "other")):
        cause = KubeApiError(status, "", "refused")
        try:
            try:
                raise cause
            except KubeApiError as exc:
                raise KernelStartError("cannot create pod ns/p: refused") from exc
        except KernelStartError as error:
            assert metrics.failure_reason(error) == outcome, status


def test_a_config_refused_outside_a_start_is_no_failed_start(tmp_path: Path) -> None:
    """A provisioner made to look for kernels (an adoption round, every 15 s, or the
    command line) is not a start: its refused config is no failed start; the same refusal
    while a kernel manager starts the kernel is one."""
    ksm = write_kernelspec(tmp_path / "kernels", "refused", LOCAL_PROVISIONER, {"no_key": 1})
    spec = ksm.get_kernel_spec("refused")
    key = (START, start_labels("local", "refused", "config"))

    def count() -> float:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in REGISTRY.collect()
            for s in family.samples
        }.get(key, 0.0)

    before = count()
    factory = KernelProvisionerFactory.instance()
    for parent in (None, AsyncMultiKernelManager(kernel_spec_manager=ksm)):  # as adoption does
        with pytest.raises(ProvisionerConfigError, match="no_key"):
            factory.create_provisioner_instance("adopt-refused", spec, parent=parent)
    assert count() == before
    km = KernelManager(kernel_name="refused", kernel_spec_manager=ksm)
    with pytest.raises(ProvisionerConfigError, match="no_key"):
        km.start_kernel()
    assert count() == before + 1

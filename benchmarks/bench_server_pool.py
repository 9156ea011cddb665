"""A pooled start through a real Jupyter Server, the way a notebook client starts a kernel.

From ``POST /api/kernels`` to the first ``kernel_info_reply`` over the kernel's websocket,
for a kernelspec whose warm pool holds a ready kernel (Docker on the local daemon;
Kubernetes on $KUBECONFIG when set, else the API double, with ``--targets kubernetes``,
reached on the pod IP as the chart's server reaches it, or ``--k8s-mode port-forward``).
Each sample is split into its steps: the POST (the claim and Jupyter Server's own start),
the websocket's opening (the server connects its ZMQ streams and nudges the kernel) and
the reply. The
baselines, measured in the same run on the same server, are reconnects: a new websocket
and its first reply, to the pooled kernel once it runs and to a local kernel of
jupyter_client's own provisioner (Jupyter Server's floor for any kernel: it nudges the
kernel until its iopub subscription is established before it relays a message). Goal:
pooled start <= 100 ms. The server is stopped (its pools drained) at the end.
Run: ``python -m benchmarks.bench_server_pool [--targets docker] [--runs 7]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec
from tests.jupyter_server import JupyterServer, http, message

TARGETS = ("docker", "kubernetes")
GOAL_MS = 100.0
SPEC = "pooled"


@contextlib.contextmanager
def target_config(target: str, k8s_mode: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(provisioner name, config) of a pooled kernelspec on ``target``."""
    if target == "docker":
        yield (
            "cluster-docker-provisioner",
            {"image": KERNEL_TEST_IMAGE, "fallback": "none", "pool_size": 1},
        )
        return
    from benchmarks.bench_kubernetes import kernel_config, kube_target

    with kube_target() as (kubeconfig, namespace):
        config = {**kernel_config(kubeconfig, namespace, k8s_mode), "pool_size": 1}
        yield "cluster-kubernetes-provisioner", config


def pool_server(root: Path, provisioner: str, config: dict[str, Any]) -> JupyterServer:
    """A Jupyter Server whose ``pooled`` kernelspec's pool fills at start."""
    write_kernelspec(root / "data" / "kernels", SPEC, provisioner, config, argv=CONTAINER_ARGV)
    settings = {
        "ServerApp": {"jpserver_extensions": {"provisioners.pool": True}},
        "KernelPools": {"prefill": [SPEC], "refill_delay": 0.5},
    }
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "jupyter_server_config.json").write_text(json.dumps(settings))
    return JupyterServer(root, env={"JUPYTER_CONFIG_DIR": str(root / "config")})


def metric(server: JupyterServer, name: str) -> float:
    """The value of the sample ``name`` (with its labels) on the server's /metrics."""
    status, raw = http("GET", server.base + "metrics", server.token, timeout=10)
    for line in raw.decode(errors="replace").splitlines() if status == 200 else []:
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def warm_ready(server: JupyterServer) -> bool:
    return (
        metric(server, f'cluster_provisioners_pool_kernels{{kernelspec="{SPEC}",state="ready"}}')
        > 0
    )


async def wait_warm(server: JupyterServer, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(warm_ready, server):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no warm kernel within {timeout:g} s:\n{server.log()[-3000:]}")
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # let the pool's loop settle after the fill


async def first_reply(server: JupyterServer, kernel_id: str) -> tuple[float, float, Any]:
    """Open a websocket to ``kernel_id`` and send kernel_info_request: seconds to the
    open and to the reply, and the open websocket."""
    from websockets.asyncio.client import connect

    session = uuid.uuid4().hex
    t0 = time.perf_counter()
    ws = await connect(
        server.ws_url(kernel_id, session), additional_headers=server.ws_headers(), max_size=None
    )
    opened = time.perf_counter() - t0
    request = message(session, "kernel_info_request", {})
    await ws.send(json.dumps(request))
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        parent = reply.get("parent_header", {}).get("msg_id")
        if parent == request["msg_id"] and reply["msg_type"] == "kernel_info_reply":
            return opened, time.perf_counter() - t0, ws


async def one_pooled_start(server: JupyterServer) -> tuple[float, float, float, str]:
    """(POST s, websocket open s, total s to the first reply, kernel id)."""
    t0 = time.perf_counter()
    status, model = await asyncio.to_thread(server.request, "POST", "api/kernels", {"name": SPEC})
    posted = time.perf_counter() - t0
    assert status == 201, model
    opened, replied, ws = await first_reply(server, model["id"])
    await ws.close()
    return posted, opened, posted + replied, model["id"]


async def bench_target(target: str, runs: int, k8s_mode: str = "pod-ip") -> None:
    with (
        target_config(target, k8s_mode) as (provisioner, config),
        tempfile.TemporaryDirectory() as tmp,
        pool_server(Path(tmp), provisioner, config) as server,
    ):
        rows: list[tuple[float, float, float]] = []
        reconnects: list[float] = []
        for _ in range(runs):
            await wait_warm(server)
            posted, opened, total, kernel_id = await one_pooled_start(server)
            rows.append((posted, opened, total))
            _, replied, ws = await first_reply(server, kernel_id)
            await ws.close()
            reconnects.append(replied)
            await asyncio.to_thread(server.request, "DELETE", f"api/kernels/{kernel_id}")
        status, model = await asyncio.to_thread(
            server.request, "POST", "api/kernels", {"name": "python3"}
        )
        assert status == 201, model
        local = []
        for _ in range(runs):
            _, replied, ws = await first_reply(server, model["id"])
            await ws.close()
            local.append(replied)
        claims = int(
            metric(server, f'cluster_provisioners_pool_claims_total{{kernelspec="{SPEC}"}}')
        )
    post, opened, total = (statistics.median(col) * 1000 for col in zip(*rows, strict=True))
    base = statistics.median(reconnects) * 1000
    floor = statistics.median(local) * 1000
    verdict = "met" if total <= GOAL_MS else "MISSED"
    if target == "kubernetes":
        target = f"kubernetes ({k8s_mode})"
    print(
        f"{target}: pooled start via Jupyter Server median {total:.0f} ms "
        f"(POST {post:.0f} ms, websocket open {opened:.0f} ms, reply {total - post:.0f} ms "
        f"after the POST); {claims} of {runs} starts claimed a warm kernel; goal <= "
        f"{GOAL_MS:.0f} ms: {verdict}"
    )
    print(
        f"{target}: baseline, a reconnect to a running kernel (websocket + first reply): "
        f"{base:.0f} ms; a local kernel's (LocalProvisioner) {floor:.0f} ms; pooled start / "
        f"reconnect = {total / base:.2f}x, / local reconnect = {total / floor:.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=["docker"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--k8s-mode",
        choices=["pod-ip", "port-forward"],
        default="pod-ip",
        help="how the server reaches a Kubernetes kernel (the chart's server: pod-ip)",
    )
    args = parser.parse_args(argv)
    for target in args.targets:
        asyncio.run(bench_target(target, args.runs, args.k8s_mode))


if __name__ == "__main__":
    main()

"""Kubernetes provisioner: start-to-kernel_info against pod-Running time, and the execute
round trip through the port-forward, and through the pod-IP mode's relay, against the
direct pod-IP path.

Runs against $KUBECONFIG when set (namespace $CLUSTER_PROVISIONERS_TEST_NAMESPACE, image
$CLUSTER_PROVISIONERS_TEST_IMAGE), else against the in-repo API double (needs Docker and
the kernel test image). Goals: kernel_info within 0.5 s of the pod running; a round trip
through the port-forward at most twice the direct one, through the relay at most 1.25
times. Each comparison uses one kernel, alternating the two paths. Run:
``python benchmarks/bench_kubernetes.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timed_start
from provisioners.connection.files import PORT_NAMES
from provisioners.k8s.provisioner import KubernetesClusterProvisioner
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec

PROVISIONER = "cluster-kubernetes-provisioner"
START_GOAL = 0.5  # s between the pod running and the first kernel_info reply
RTT_GOAL = 2.0  # port-forward / direct
RELAY_GOAL = 1.25  # pod-IP relay / direct


@contextlib.contextmanager
def kube_target() -> Iterator[tuple[str, str]]:
    """(kubeconfig, namespace): $KUBECONFIG's, or a fresh API double's."""
    if os.environ.get("KUBECONFIG"):
        namespace = os.environ.get("CLUSTER_PROVISIONERS_TEST_NAMESPACE", "default")
        yield os.environ["KUBECONFIG"], namespace
        return
    from tests.kubernetes.apidouble.double import K8sDouble

    with K8sDouble(helper_image=KERNEL_TEST_IMAGE) as double:
        yield double.kubeconfig, double.namespace


def kernel_config(kubeconfig: str, namespace: str, mode: str = "port-forward") -> dict[str, Any]:
    """The benchmarks' Kubernetes provisioner config (port-forward, no fallback)."""
    return {
        "kubeconfig": kubeconfig,
        "namespace": namespace,
        "image": KERNEL_TEST_IMAGE,
        "fallback": "none",
        "sweep_on_start": False,
        "connection_mode": mode,
        "termination_grace_period": 1,
    }


async def timed_pod_start(
    ksm: KernelSpecManager, name: str
) -> tuple[float, float, float, AsyncKernelManager]:
    """Seconds from start_kernel to the pod running, to the kernel listening (its shell
    port greets) and to the first kernel_info reply."""
    ready, km = await timed_start(ksm, name, timeout=60)
    prov = km.provisioner
    assert isinstance(prov, KubernetesClusterProvisioner)
    timings: dict[str, float] = getattr(prov.engine, "timings", {})
    running = timings["running"] - timings["start"]
    listening = timings["listening"] - timings["start"]
    return running, listening, ready, km


async def round_trips(kc: AsyncKernelClient, count: int) -> list[float]:
    """Seconds per execute_request -> execute_reply of an empty cell."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        reply = await kc.execute("pass", reply=True, timeout=30)
        out.append(time.perf_counter() - t0)
        assert reply["content"]["status"] == "ok"
    return out


def direct_client(km: AsyncKernelManager) -> AsyncKernelClient:
    """A client of ``km``'s kernel on its pod IP and pod ports (bypassing the forward)."""
    prov = km.provisioner
    assert isinstance(prov, KubernetesClusterProvisioner)
    info: dict[str, Any] = dict(km.get_connection_info())
    engine: Any = prov.engine
    info.update({n: int(engine.kernel_info[n]) for n in PORT_NAMES}, ip=engine.pod_ip)
    kc = AsyncKernelClient()
    kc.load_connection_info(info)
    return kc


async def main_async(runs: int, trips: int) -> None:
    with kube_target() as (kubeconfig, namespace), tempfile.TemporaryDirectory() as kernels:
        config = kernel_config(kubeconfig, namespace)
        ksm = write_kernelspec(Path(kernels), "bench", PROVISIONER, config, argv=CONTAINER_ARGV)
        *_, km = await timed_pod_start(ksm, "bench")  # warm-up
        await km.shutdown_kernel(now=True)

        running, listening, ready = [], [], []
        for _ in range(runs):
            r, li, k, km = await timed_pod_start(ksm, "bench")
            running.append(r)
            listening.append(li)
            ready.append(k)
            await km.shutdown_kernel(now=True)
        med_run, med_ready = statistics.median(running), statistics.median(ready)
        med_listen = statistics.median(listening)
        print(f"start, median of {runs} (port-forward):")
        print(f"  start -> pod Running       {med_run:.3f} s  {_rounded(running)}")
        print(f"  start -> kernel listening  {med_listen:.3f} s  {_rounded(listening)}")
        print(f"  start -> kernel_info reply {med_ready:.3f} s  {_rounded(ready)}")
        gap = med_ready - med_run
        verdict = "ok" if gap <= START_GOAL else "MISSED"
        print(f"  kernel_info - Running      {gap:+.3f} s  (goal <= {START_GOAL} s: {verdict})")
        boot, connect = med_listen - med_run, med_ready - med_listen
        print(f"    the kernel's own boot (Running -> listening)  {boot:.3f} s")
        print(f"    connecting + kernel_info (listening -> reply) {connect:.3f} s")
        print(f"  ratio kernel_info/Running  {med_ready / med_run:.2f}")

        relay_config = kernel_config(kubeconfig, namespace, "pod-ip")
        write_kernelspec(Path(kernels), "relay", PROVISIONER, relay_config, argv=CONTAINER_ARGV)
        for name, label, goal in (
            ("bench", "port-forward", RTT_GOAL),
            ("relay", "relay", RELAY_GOAL),
        ):
            *_, km = await timed_pod_start(ksm, name)
            try:
                medians = await compare_round_trips(km, trips)
            finally:
                await km.shutdown_kernel(now=True)
            if medians is None:
                print("execute round trip: the pod IP is not reachable from here; skipped")
                return
            (med_via, med_ip), count = medians
            ratio = med_via / med_ip
            verdict = "ok" if ratio <= goal else "MISSED"
            print(f"execute round trip ({label}), median of {count}:")
            print(f"  direct (pod IP)            {med_ip * 1000:.2f} ms")
            print(f"  {label:<26} {med_via * 1000:.2f} ms")
            print(f"  ratio {label + '/direct':<20} {ratio:.2f}  (goal <= {goal}: {verdict})")


async def compare_round_trips(
    km: AsyncKernelManager, trips: int
) -> tuple[tuple[float, float], int] | None:
    """Median round trips through ``km``'s own address and on the pod IP, alternating
    batches on one kernel (None when the pod IP cannot be reached from here)."""
    via_client = km.client()
    direct = direct_client(km)
    try:
        via_client.start_channels()
        await via_client.wait_for_ready(timeout=30)
        direct.start_channels()
        try:
            await direct.wait_for_ready(timeout=5)
        except RuntimeError:
            return None
        await round_trips(via_client, 5)
        await round_trips(direct, 5)
        via: list[float] = []
        on_ip: list[float] = []
        for _ in range(trips // 10):
            via += await round_trips(via_client, 10)
            on_ip += await round_trips(direct, 10)
    finally:
        via_client.stop_channels()
        direct.stop_channels()
    return (statistics.median(via), statistics.median(on_ip)), len(via)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (against $KUBECONFIG, or the API double with Docker)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="sequential kernel starts")
    parser.add_argument("--trips", type=int, default=100, help="execute round trips per path")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    asyncio.run(main_async(args.runs, args.trips))
    print(f"(benchmark took {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()

"""Kernel start-to-kernel_info through the Docker provisioner vs a bare container run.

Both paths use the same image, kernel command and client code and are measured in the
same run, alternating, so the ratio compares like with like. Also times 20 concurrent
starts against 20 concurrent bare ``docker run`` calls of the same image and command, in
the same run (alternating rounds). Run:
``python benchmarks/bench_docker.py [--runs 5] [--burst 20] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import timed_start
from provisioners.connection.ports import ClusterPortCache, zmq_listens
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec

PROVISIONER = "cluster-docker-provisioner"
BENCH_LABEL = "cluster-provisioners.benchmark"


async def _ready(client: AsyncKernelClient, timeout: float = 60) -> None:
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout)
    finally:
        client.stop_channels()


async def provisioner_start(ksm: KernelSpecManager) -> tuple[float, AsyncKernelManager]:
    """Seconds from start_kernel to the first kernel_info reply, and the manager."""
    return await timed_start(ksm, "bench", timeout=60)


def _run_bare(client: docker.DockerClient, folder: str, ports: list[int]) -> Any:
    argv = [a.replace("{connection_file}", "/conn/connection.json") for a in CONTAINER_ARGV]
    return client.containers.run(
        KERNEL_TEST_IMAGE,
        argv,
        detach=True,
        ports={f"{p}/tcp": ("127.0.0.1", p) for p in ports},
        volumes={folder: {"bind": "/conn", "mode": "rw"}},
        labels={BENCH_LABEL: "bare"},
    )


async def bare_start(
    client: docker.DockerClient,
    probe: bool = False,
    pool: ThreadPoolExecutor | None = None,
    ready_at: list[float] | None = None,
) -> float:
    """Seconds from ``docker run`` (file bind-mounted) to the first kernel_info reply.

    With ``probe`` the client connects only once the heartbeat port answers (as the
    provisioner does), else at once, as a plain script would. ``pool``: the threads the
    blocking ``docker run`` takes (asyncio's default ones are few); ``ready_at`` gets
    the moment the kernel answered (its removal after is not timed).
    """
    owner = f"bench-bare-{uuid.uuid4()}"
    cache = ClusterPortCache.instance()
    ports = await asyncio.to_thread(cache.allocate, 5, owner)
    container = None
    with tempfile.TemporaryDirectory() as folder:
        names = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
        info = dict(zip(names, ports, strict=True))
        write_connection_file(f"{folder}/connection.json", ip="0.0.0.0", **info)
        kc = AsyncKernelClient()
        kc.load_connection_file(f"{folder}/connection.json")
        kc.ip = "127.0.0.1"
        try:
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            container = await loop.run_in_executor(pool, _run_bare, client, folder, ports)
            while probe and not await zmq_listens("127.0.0.1", info["hb_port"]):
                await asyncio.sleep(0.05)
            await _ready(kc)
            ready = time.perf_counter()
            if ready_at is not None:
                ready_at.append(ready)
            return ready - t0
        finally:
            if container is not None:
                await loop.run_in_executor(pool, lambda: container.remove(force=True))
            cache.release(owner)


async def bare_burst(client: docker.DockerClient, burst: int) -> tuple[float, int]:
    """Seconds for ``burst`` concurrent bare runs to all answer kernel_info; failures.

    Each client connects once the heartbeat port answers, as the provisioner does: one
    connecting at once gave up ("Kernel died before replying") on most of 20 loaded
    kernels, its heartbeat unanswered for a second.
    """
    ready_at: list[float] = []
    with ThreadPoolExecutor(burst, "bare-docker-run") as pool:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(bare_start(client, True, pool, ready_at) for _ in range(burst)),
            return_exceptions=True,
        )
    total = max(ready_at, default=t0) - t0  # the removals after are not timed
    failures = [r for r in results if not isinstance(r, float)]
    for failure in failures[:3]:
        print(f"  bare failure: {failure!r}")
    return total, len(failures)


async def ours_burst(ksm: KernelSpecManager, burst: int) -> tuple[float, int]:
    """Seconds for ``burst`` concurrent provisioner starts to all answer kernel_info
    (each from its own start_kernel); failures. The kernels are shut down after."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(provisioner_start(ksm) for _ in range(burst)), return_exceptions=True
    )
    total = time.perf_counter() - t0
    managers = [r[1] for r in results if isinstance(r, tuple)]
    failures = [r for r in results if not isinstance(r, tuple)]
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))
    for failure in failures[:3]:
        print(f"  provisioner failure: {failure!r}")
    return total, len(failures)


async def main_async(runs: int, burst: int, rounds: int = 2) -> None:
    client = docker.from_env(timeout=60, max_pool_size=max(10, burst))
    client.images.get(KERNEL_TEST_IMAGE)
    with tempfile.TemporaryDirectory() as kernels:
        ksm = write_kernelspec(
            Path(kernels),
            "bench",
            PROVISIONER,
            {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False},
            argv=CONTAINER_ARGV,
        )
        # warm up both paths (image layers in the page cache, imports)
        await bare_start(client)
        _, km = await provisioner_start(ksm)
        await km.shutdown_kernel(now=True)

        ours: list[float] = []
        bare: list[float] = []
        probed: list[float] = []
        for _ in range(runs):
            bare.append(await bare_start(client))
            probed.append(await bare_start(client, probe=True))
            seconds, km = await provisioner_start(ksm)
            ours.append(seconds)
            await km.shutdown_kernel(now=True)
        med_ours, med_bare = statistics.median(ours), statistics.median(bare)
        med_probed = statistics.median(probed)
        print(f"start -> kernel_info, median of {runs}:")
        print(f"  bare docker run            {med_bare:.3f} s  {_rounded(bare)}")
        print(f"  bare docker run, hb probe  {med_probed:.3f} s  {_rounded(probed)}")
        print(f"  docker provisioner         {med_ours:.3f} s  {_rounded(ours)}")
        print(f"  ratio vs bare run          {med_ours / med_bare:.2f}  (goal <= 1.15)")
        print(f"  ratio vs probed bare run   {med_ours / med_probed:.2f}")

        bare_totals: list[float] = []
        our_totals: list[float] = []
        failed = 0
        for _ in range(rounds):  # alternating, so drift hits both alike
            total, bad = await bare_burst(client, burst)
            bare_totals.append(total)
            failed += bad
            total, bad = await ours_burst(ksm, burst)
            our_totals.append(total)
            failed += bad
        med_bare_burst = statistics.median(bare_totals)
        med_our_burst = statistics.median(our_totals)
        print(f"{burst} concurrent starts -> all answer kernel_info, median of {rounds} rounds:")
        print(f"  bare docker run            {med_bare_burst:.2f} s  {_rounded(bare_totals)}")
        print(f"  docker provisioner         {med_our_burst:.2f} s  {_rounded(our_totals)}")
        ratio = med_our_burst / med_bare_burst
        verdict = "ok" if ratio <= 1.10 else "OVER GOAL"
        print(f"  ratio vs bare runs         {ratio:.2f}  (goal <= 1.10) {verdict}")
        print(f"  ({med_our_burst / med_ours:.1f}x one provisioner start; {failed} failed)")
    client.close()


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (needs a Docker daemon and the kernel test image)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="sequential starts per path")
    parser.add_argument("--burst", type=int, default=20, help="concurrent starts")
    parser.add_argument("--rounds", type=int, default=2, help="alternating burst rounds")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.runs, args.burst, args.rounds))


if __name__ == "__main__":
    main()

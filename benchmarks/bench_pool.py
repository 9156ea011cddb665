"""Warm kernel pools: a pooled start against a cold start of the same kernelspec.

For each target (Docker on the local daemon; Kubernetes on $KUBECONFIG when set, else the
in-repo API double), in the same run: the time from ``start_kernel`` to the first
``kernel_info_reply`` on the shell channel, measured on the reply, for starts that claim a
warm kernel (``pool_size`` = the number of samples, each sample checked to be a claim)
and for cold starts of the same kernelspec with ``pool_size = 0``, alternating, the pool
refilled between samples. Goal: pooled <= 100 ms and <= 0.1x cold. Then the wall time of
``--burst`` concurrent starts claiming from a pool of that size against as many cold
ones. The pools are drained at the end and nothing of this process is left running.
Run: ``python -m benchmarks.bench_pool [--targets docker kubernetes] [--runs 5] [--burst 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import start_to_shell_reply
from provisioners.lifecycle.base import ClusterProvisioner
from provisioners.lifecycle.owner import ServerIdentity
from provisioners.pool.pools import KernelPools
from provisioners.pool.warm import WarmPool
from provisioners.targets import provisioner_for
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec

TARGETS = ("docker", "kubernetes")
PROVISIONERS = {
    "docker": "cluster-docker-provisioner",
    "kubernetes": "cluster-kubernetes-provisioner",
}
GOAL_MS = 100.0
GOAL_RATIO = 0.1
FILL_TIMEOUT = 300.0


@contextlib.asynccontextmanager
async def target_config(target: str) -> AsyncIterator[dict[str, Any]]:
    """The provisioner config of ``target`` (with the API double running, for Kubernetes)."""
    if target == "docker":
        yield {"image": KERNEL_TEST_IMAGE, "fallback": "none", "sweep_on_start": False}
        return
    from benchmarks.bench_kubernetes import kernel_config, kube_target

    with kube_target() as (kubeconfig, namespace):
        yield kernel_config(kubeconfig, namespace)


def claimed(km: AsyncKernelManager) -> bool:
    """Whether ``km``'s kernel is a claimed warm kernel (its engine was swapped in)."""
    prov = km.provisioner
    assert isinstance(prov, ClusterProvisioner)
    return bool(prov.engine.claimed_from)


def pool_of(spec_name: str) -> WarmPool | None:
    return next((p for p in KernelPools.instance().pools() if p.spec_name == spec_name), None)


def prefill(ksm: KernelSpecManager, spec_name: str) -> None:
    """Create the kernelspec's pool (it starts filling), as the server extension does."""
    km = AsyncKernelManager(kernel_name=spec_name, kernel_spec_manager=ksm)
    spec = ksm.get_kernel_spec(spec_name)
    template = KernelProvisionerFactory.instance(parent=km).create_provisioner_instance(
        f"prefill-{uuid.uuid4()}", spec, parent=km
    )
    assert isinstance(template, ClusterProvisioner)
    KernelPools.instance().ensure(template)


async def filled(spec_name: str, timeout: float = FILL_TIMEOUT) -> float:
    """Wait until the pool holds ``size`` ready kernels and starts none; seconds waited."""
    start = time.perf_counter()
    while True:
        pool = pool_of(spec_name)
        if pool is not None and len(pool.ready) >= pool.size and pool.starting == 0:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            held = "no pool" if pool is None else f"{len(pool.ready)} ready of {pool.size}"
            msg = f"pool {spec_name!r} not filled within {timeout:g} s ({held})"
            raise TimeoutError(msg)
        await asyncio.sleep(0.05)


async def one_start(ksm: KernelSpecManager, name: str, want_claim: bool) -> float:
    """One timed start of ``name`` (checked to be a claim or a cold start), then stopped."""
    seconds, km = await start_to_shell_reply(ksm, name)
    try:
        was_claimed = claimed(km)
    finally:
        await km.shutdown_kernel(now=True)
    if was_claimed != want_claim:
        raise AssertionError(f"start of {name!r}: claimed={was_claimed}, expected {want_claim}")
    return seconds


async def burst_starts(ksm: KernelSpecManager, name: str, count: int) -> tuple[float, int, int]:
    """Wall seconds of ``count`` concurrent starts, how many claimed, how many failed."""
    start = time.perf_counter()
    results = await asyncio.gather(
        *(start_to_shell_reply(ksm, name) for _ in range(count)), return_exceptions=True
    )
    wall = time.perf_counter() - start
    managers = [r[1] for r in results if isinstance(r, tuple)]
    claims = sum(claimed(km) for km in managers)
    for failure in [r for r in results if not isinstance(r, tuple)][:3]:
        print(f"    failure: {failure!r}")
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))
    return wall, claims, count - len(managers)


async def ours_left(ksm: KernelSpecManager) -> list[str]:
    """Kernels of this process the engine still lists (through the pool-less kernelspec)."""
    me = str(ServerIdentity.current())
    rows = await provisioner_for(ksm.get_kernel_spec("cold")).list_kernels()
    return [f"{r['kernel_id']} ({r['state']})" for r in rows if r.get("owner") == me]


async def bench_target(target: str, runs: int, burst: int) -> bool:
    """Measure one target; True when the sequential goal holds."""
    pools = KernelPools.instance()
    pools.max_total = max(runs, burst)
    provisioner = PROVISIONERS[target]
    async with target_config(target) as config:
        with tempfile.TemporaryDirectory() as kernels:
            ksm: KernelSpecManager | None = None
            for name, size in (("pooled", runs), ("cold", 0), ("burst", burst)):
                ksm = write_kernelspec(
                    Path(kernels),
                    name,
                    provisioner,
                    {**config, "pool_size": size},
                    argv=CONTAINER_ARGV,
                )
            assert ksm is not None
            try:
                return await _measure(target, ksm, runs, burst)
            finally:
                await pools.drain()
                left = await ours_left(ksm)
                print(f"  left behind after the drain: {', '.join(left) or 'nothing'}")


async def _measure(target: str, ksm: KernelSpecManager, runs: int, burst: int) -> bool:
    await one_start(ksm, "cold", want_claim=False)  # warm-up: image, imports, engine client
    prefill(ksm, "pooled")
    fill = await filled("pooled")
    listed = await provisioner_for(ksm.get_kernel_spec("cold")).list_kernels()
    states = sorted({r["state"] for r in listed if r["kernel_id"].startswith("pool-")})
    print(f"  pool of {runs} filled in {fill:.1f} s; listed with state {', '.join(states)}")

    await one_start(ksm, "pooled", want_claim=True)  # warm-up of the claim path
    await filled("pooled")
    pooled: list[float] = []
    cold: list[float] = []
    for _ in range(runs):
        pooled.append(await one_start(ksm, "pooled", want_claim=True))
        await filled("pooled")  # refilled: the cold sample runs on a quiet machine too
        cold.append(await one_start(ksm, "cold", want_claim=False))
    await KernelPools.instance().drain("pooled")
    med_pooled, med_cold = statistics.median(pooled) * 1000, statistics.median(cold) * 1000
    ratio = med_pooled / med_cold
    met = med_pooled <= GOAL_MS and ratio <= GOAL_RATIO
    print(f"  start -> kernel_info_reply (shell), median of {runs}, every pooled start a claim:")
    print(f"    pooled  {med_pooled:8.1f} ms  {_ms(pooled)}")
    print(f"    cold    {med_cold:8.1f} ms  {_ms(cold)}")
    print(
        f"    ratio pooled/cold {ratio:.3f}  "
        f"(goal <= {GOAL_MS:g} ms and <= {GOAL_RATIO}x cold: {'ok' if met else 'MISSED'})"
    )

    if burst > 0:
        prefill(ksm, "burst")
        await filled("burst")
        wall_pooled, claims, failed_pooled = await burst_starts(ksm, "burst", burst)
        await KernelPools.instance().drain("burst")
        wall_cold, _, failed_cold = await burst_starts(ksm, "cold", burst)
        print(f"  {burst} concurrent starts (pool_size={burst} vs cold), wall time:")
        print(f"    pooled  {wall_pooled:6.2f} s  ({claims} claimed, {failed_pooled} failed)")
        print(f"    cold    {wall_cold:6.2f} s  ({failed_cold} failed)")
        print(f"    ratio pooled/cold {wall_pooled / wall_cold:.3f}")
        if claims != burst - failed_pooled:
            print(f"    note: {burst - failed_pooled - claims} start(s) were cold")
    return met


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 1) for v in values]


async def main_async(targets: list[str], runs: int, burst: int) -> None:
    for target in targets:
        print(f"{target}:")
        started = time.perf_counter()
        try:
            await bench_target(target, runs, burst)
        except Exception as exc:  # one unavailable engine must not hide the other
            print(f"  {target}: not measured: {type(exc).__name__}: {exc}")
        print(f"  ({target} took {time.perf_counter() - started:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (Docker and the kernel test image; $KUBECONFIG or the API double)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--runs", type=int, default=5, help="pooled and cold starts each")
    parser.add_argument("--burst", type=int, default=20, help="concurrent starts (0: none)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    asyncio.run(main_async(args.targets, args.runs, args.burst))


if __name__ == "__main__":
    main()

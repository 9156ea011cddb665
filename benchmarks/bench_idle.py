"""The cost of an idle kernel in the server process: Docker kernels vs LocalProvisioner.

N kernels of each kind are started through one ``AsyncMultiKernelManager`` of this
process, with jupyter_client's restarter (``AsyncIOLoopKernelManager``, as Jupyter Server
uses: it polls every kernel every 3 s). Measured per kernel, as the process's growth
divided by N: fds, sockets (unix sockets apart: connections to dockerd), threads and RSS;
then the process's CPU while the N kernels sit idle for ``--seconds`` (and dockerd's).
Both kinds are measured in the same run, one after the other, and printed with their
ratio. Run: ``python benchmarks/bench_idle.py [--count 100] [--seconds 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import psutil
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LOCAL_ARGV, kernelspecs
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE

#: Kernels started at once while filling up.
START_BATCH = 10
#: Seconds after the last start before measuring (first restarter polls, settling).
SETTLE = 8.0


@dataclass
class Usage:
    """What this process holds."""

    fds: float
    sockets: float
    unix: float
    threads: float
    rss_mb: float


def usage() -> Usage:
    """This process's open fds, sockets, unix sockets, threads and RSS now."""
    with open("/proc/net/unix") as table:
        next(table)
        unix_inodes = {line.split()[6] for line in table if len(line.split()) > 6}
    fds = sockets = unix = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        fds += 1
        if link.startswith("socket:["):
            sockets += 1
            unix += link[8:-1] in unix_inodes
    process = psutil.Process()
    return Usage(fds, sockets, unix, process.num_threads(), process.memory_info().rss / 2**20)


def _dockerd() -> psutil.Process | None:
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "dockerd":
            return process
    return None


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


async def measure(kernel_name: str, count: int, seconds: float, ksm: object) -> dict[str, float]:
    """Per-kernel usage of ``count`` idle kernels of ``kernel_name``, and idle CPU %."""
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=ksm,
        kernel_manager_class="jupyter_client.ioloop.AsyncIOLoopKernelManager",
        connection_dir=tempfile.mkdtemp(prefix="cp-bench-idle-"),  # not the cwd
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    extra = quiet if kernel_name.endswith("local") else {}
    # one kernel started and stopped first: imports and caches are not counted
    await mkm.shutdown_kernel(await mkm.start_kernel(kernel_name=kernel_name, **extra), now=True)
    gc.collect()
    before = usage()
    started = time.perf_counter()
    try:
        for first in range(0, count, START_BATCH):
            batch = range(first, min(count, first + START_BATCH))
            await asyncio.gather(
                *(mkm.start_kernel(kernel_name=kernel_name, **extra) for _ in batch)
            )
        start_seconds = time.perf_counter() - started
        await asyncio.sleep(SETTLE)
        gc.collect()
        after = usage()
        me, dockerd = psutil.Process(), _dockerd()
        cpu0, daemon0, t0 = _cpu_seconds(me), _cpu_seconds(dockerd), time.perf_counter()
        await asyncio.sleep(seconds)
        wall = time.perf_counter() - t0
        cpu = (_cpu_seconds(me) - cpu0) / wall * 100
        daemon_cpu = (_cpu_seconds(dockerd) - daemon0) / wall * 100
        alive = sum([await mkm.is_alive(k) for k in mkm.list_kernel_ids()])
    finally:
        with contextlib.suppress(Exception):
            await mkm.shutdown_all(now=True)
    result = {
        f.name: (getattr(after, f.name) - getattr(before, f.name)) / count for f in fields(Usage)
    }
    result.update(cpu=cpu, dockerd_cpu=daemon_cpu, alive=alive, start_seconds=start_seconds)
    return result


def _ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base > 0.005 else f"{ours - base:+.2f}"


async def main_async(count: int, seconds: float) -> None:
    ksm = kernelspecs(
        {
            "idle-local": ("local-provisioner", {}, LOCAL_ARGV),
            "idle-docker": (
                "cluster-docker-provisioner",
                {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "fallback": "none"},
                CONTAINER_ARGV,
            ),
        }
    )
    local = await measure("idle-local", count, seconds, ksm)
    docker = await measure("idle-docker", count, seconds, ksm)
    print(
        f"{count} idle kernels each, one AsyncMultiKernelManager with restarters "
        f"(poll every 3 s), idle CPU over {seconds:g} s; per kernel:"
    )
    rows = [
        ("fds", "fds", "{:.2f}"),
        ("sockets", "sockets", "{:.2f}"),
        ("unix sockets", "unix", "{:.2f}"),
        ("threads", "threads", "{:.2f}"),
        ("RSS MB", "rss_mb", "{:.2f}"),
    ]
    print(f"  {'':22}{'LocalProvisioner':>18}{'Docker':>12}{'ratio':>10}")
    for title, key, fmt in rows:
        ours, base = docker[key], local[key]
        print(
            f"  {title + ' per kernel':22}{fmt.format(base):>18}{fmt.format(ours):>12}"
            f"{_ratio(ours, base):>10}"
        )
    print(
        f"  {'idle CPU % (process)':22}{local['cpu']:>18.2f}{docker['cpu']:>12.2f}"
        f"{_ratio(docker['cpu'], local['cpu']):>10}"
    )
    daemon = f"{local['dockerd_cpu']:>18.2f}{docker['dockerd_cpu']:>12.2f}"
    print(f"  {'idle CPU % (dockerd)':22}{daemon}")
    print(
        f"  {'alive at the end':22}{local['alive']:>18.0f}{docker['alive']:>12.0f}"
        f"    (start of all: {local['start_seconds']:.0f} s, {docker['start_seconds']:.0f} s)"
    )
    extra = (docker["sockets"] - local["sockets"]) * count
    print(f"  Docker sockets beyond LocalProvisioner's: {extra:.0f} in all (goal: a constant)")
    verdict = "ok" if docker["cpu"] <= 1.0 else "OVER GOAL"
    print(f"  Docker idle CPU {docker['cpu']:.2f} % of a core (goal <= 1 %) {verdict}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (needs a Docker daemon and the kernel test image)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="idle kernels of each kind")
    parser.add_argument("--seconds", type=float, default=30, help="idle CPU window")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.count, args.seconds))


if __name__ == "__main__":
    main()

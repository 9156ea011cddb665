"""Shared pieces of the benchmarks: timing helpers and a kernelspec directory."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

LOCAL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def kernelspecs(specs: dict[str, tuple[str, dict[str, Any], list[str]]]) -> KernelSpecManager:
    """A temporary kernelspec dir: name -> (provisioner, config, argv)."""
    root = Path(tempfile.mkdtemp(prefix="cp-bench-"))
    for name, (provisioner, config, argv) in specs.items():
        (root / name).mkdir()
        spec = {
            "argv": argv,
            "display_name": name,
            "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": provisioner, "config": config}},
        }
        (root / name / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root)])


async def timed_start(
    ksm: KernelSpecManager, name: str, timeout: float = 120
) -> tuple[float, AsyncKernelManager]:
    """Seconds from start_kernel() to the first kernel_info_reply, and the running kernel's
    manager (the caller shuts it down)."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    start = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        return time.perf_counter() - start, km
    finally:
        kc.stop_channels()


async def start_to_shell_reply(
    ksm: KernelSpecManager, name: str, timeout: float = 120
) -> tuple[float, AsyncKernelManager]:
    """Seconds from start_kernel() to the kernel_info_reply on the shell channel, measured
    on the reply itself (``wait_for_ready``'s iopub handshake would add ~0.2 s), and the
    running kernel's manager (the caller shuts it down)."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    start = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
    try:
        msg_id = kc.kernel_info()
        while True:
            reply = await kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return time.perf_counter() - start, km
    except BaseException:
        await km.shutdown_kernel(now=True)
        raise
    finally:
        kc.stop_channels()


async def start_to_kernel_info(ksm: KernelSpecManager, name: str) -> float:
    """Seconds from start_kernel() to the first kernel_info_reply; the kernel is then stopped."""
    seconds, km = await timed_start(ksm, name)
    await km.shutdown_kernel(now=True)
    return seconds


async def medians(
    runs: int, measures: dict[str, Callable[[], Awaitable[float]]]
) -> dict[str, float]:
    """Run each measure ``runs`` times, interleaved so drift hits all alike; return medians."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            samples[name].append(await measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, ours: float, baseline: float, goal: float, unit: str = "s") -> bool:
    """Print one ratio line against its goal; True when the goal is met."""
    ratio = ours / baseline
    verdict = "ok" if ratio <= goal else "OVER GOAL"
    print(
        f"{title}: ours {ours:.4f} {unit}, baseline {baseline:.4f} {unit}, "
        f"ratio {ratio:.3f} (goal <= {goal}) {verdict}"
    )
    return ratio <= goal


async def round_trips(client: Any, count: int) -> list[float]:
    """Seconds per execute_request, from sending it to the kernel being idle again."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        reply = await client.execute_interactive("pass", timeout=30, output_hook=lambda _: None)
        samples.append(time.perf_counter() - start)
        assert reply["content"]["status"] == "ok"
    return samples

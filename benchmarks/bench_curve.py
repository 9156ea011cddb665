"""Execute round trip with CurveZMQ transport encryption vs without, in the same run.

Two kernels of our local provisioner, from kernelspecs that differ only in
``transport_encryption`` ('required' vs the manager's default, plain text). A client of
each takes turns, in batches, so both see the same load; the medians and their ratio
are printed (goal <= 1.25). Also prints, for information, start-to-kernel_info of each.
Run: ``python benchmarks/bench_curve.py [--rounds 10] [--batch 20] [--starts 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LOCAL_ARGV, report, round_trips, start_to_kernel_info

GOAL = 1.25
KERNELS = {"curve": {"transport_encryption": "required"}, "plain": {}}


def curve_kernelspecs() -> KernelSpecManager:
    """Two local kernelspecs that declare Curve support; only 'curve' requires it."""
    root = Path(tempfile.mkdtemp(prefix="cp-bench-curve-"))
    for name, config in KERNELS.items():
        (root / name).mkdir()
        provisioner = {"provisioner_name": "cluster-local-provisioner", "config": config}
        spec = {
            "argv": LOCAL_ARGV,
            "display_name": name,
            "language": "python",
            "metadata": {"supported_encryption": ["curve"], "kernel_provisioner": provisioner},
        }
        (root / name / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root)])


async def execute_round_trip(ksm: KernelSpecManager, rounds: int, batch: int) -> bool:
    managers = {
        name: AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm) for name in KERNELS
    }
    clients: dict[str, AsyncKernelClient] = {}
    try:
        for name, km in managers.items():
            await km.start_kernel()
            clients[name] = km.client()
            clients[name].start_channels()
            await clients[name].wait_for_ready(timeout=60)
        assert managers["curve"].curve_publickey is not None
        assert managers["plain"].curve_publickey is None
        for client in clients.values():  # warm both paths
            await round_trips(client, batch)
        samples: dict[str, list[float]] = {name: [] for name in KERNELS}
        for _ in range(rounds):
            for name, client in clients.items():
                samples[name] += await round_trips(client, batch)
        return report(
            f"execute round trip, CurveZMQ vs plain ({rounds * batch} each)",
            statistics.median(samples["curve"]) * 1000,
            statistics.median(samples["plain"]) * 1000,
            GOAL,
            unit="ms",
        )
    finally:
        for client in clients.values():
            client.stop_channels()
        for km in managers.values():
            if km.has_kernel:
                await km.shutdown_kernel(now=True)


async def kernel_start(ksm: KernelSpecManager, starts: int) -> None:
    """For information: start-to-kernel_info with the Curve check vs without."""
    samples: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(starts):
        for name in KERNELS:
            samples[name].append(await start_to_kernel_info(ksm, name))
    curve, plain = (statistics.median(samples[name]) for name in KERNELS)
    print(
        f"local start -> kernel_info, CurveZMQ vs plain (median of {starts}): "
        f"{curve:.3f} s vs {plain:.3f} s, ratio {curve / plain:.2f} (information)"
    )


async def run(rounds: int = 10, batch: int = 20, starts: int = 3) -> bool:
    ksm = curve_kernelspecs()
    met = await execute_round_trip(ksm, rounds, batch)
    await kernel_start(ksm, starts)
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating batches per kernel")
    parser.add_argument("--batch", type=int, default=20, help="execute requests per batch")
    parser.add_argument("--starts", type=int, default=3, help="kernel starts per kernelspec")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.batch, args.starts))


if __name__ == "__main__":
    main()

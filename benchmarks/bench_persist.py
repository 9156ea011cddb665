"""Kernels that outlive their server: the downtime of a server restart with 1 and with N
persisted Docker kernels, against the same restart with no kernel, in the same run.

A real Jupyter Server with the ``provisioners.persist`` extension starts the kernels
(REST), is stopped with SIGTERM (its kernels detached) and a new one is started on the
same state. Measured: the stop (SIGTERM to exit: detaching must fit a pod's 30 s grace),
the downtime (SIGTERM to the new server answering ``GET /api/kernels`` with every kernel
adopted: the new server adopts before it listens) and the adoption alone (from the new
server's log). Baseline: the same restart with no kernel. Every kernel is then checked to
still hold its variable, and deleted.
Run: ``python -m benchmarks.bench_persist [--counts 1 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec
from tests.jupyter_server import persist_server, run_code

GOAL_DOWNTIME = 15.0  # seconds, the bound for the API's unavailability
GRACE = 30.0  # a pod's default termination grace


async def restart(count: int) -> dict[str, float]:
    """One server restart with ``count`` persisted kernels; its timings."""
    with tempfile.TemporaryDirectory(prefix="cp-bench-persist-") as folder:
        root = Path(folder)
        first = persist_server(root, sessions=False, adopt_interval=0)
        settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "persist_kernels": True}
        write_kernelspec(
            first.kernels, "kept", "cluster-docker-provisioner", settings, argv=CONTAINER_ARGV
        )
        ids: list[str] = []
        with first:
            for _ in range(count):  # one at a time: a start's own cost is not measured here
                status, model = first.request("POST", "api/kernels", {"name": "kept"})
                assert status == 201, model
                ids.append(model["id"])
            for kernel_id in ids:
                await run_code(first, kernel_id, f"kept = {kernel_id!r}")
            t0 = time.perf_counter()
            first.stop(signal.SIGTERM, timeout=120)
            stopped = time.perf_counter() - t0
        second = persist_server(root, sessions=False, adopt_interval=0)
        with second:  # returns once GET /api/status answers
            status, kernels = second.request("GET", "api/kernels")
            downtime = time.perf_counter() - t0
            assert status == 200 and sorted(k["id"] for k in kernels) == sorted(ids), kernels
            found = re.search(r"Adopted \d+ kernel\(s\)", second.log())
            adopt = _adoption_seconds(second.log())
            for kernel_id in ids:
                out = await run_code(second, kernel_id, "print(kept)")
                assert out["stdout"] == f"{kernel_id}\n", out
            for kernel_id in ids:
                second.request("DELETE", f"api/kernels/{kernel_id}")
        assert count == 0 or found, "the new server adopted nothing"
        return {"stop": stopped, "downtime": downtime, "adoption": adopt}


def _adoption_seconds(log: str) -> float:
    """The adoption's wall time as the new server logged it (listing included)."""
    found = re.search(r"Adopted \d+ kernel\(s\) in ([0-9.]+) s", log)
    return float(found.group(1)) if found else 0.0


async def main_async(counts: list[int]) -> None:
    client = docker.from_env(timeout=30)
    client.images.get(KERNEL_TEST_IMAGE)
    client.close()
    base = await restart(0)
    print(
        f"server restart, no kernel: stop {base['stop']:.2f} s, "
        f"downtime {base['downtime']:.2f} s (baseline)"
    )
    for count in counts:
        got = await restart(count)
        print(
            f"{count} persisted Docker kernel(s): stop {got['stop']:.2f} s "
            f"(pod grace {GRACE:g} s), downtime {got['downtime']:.2f} s = "
            f"{got['downtime'] / base['downtime']:.2f}x baseline (goal <= {GOAL_DOWNTIME:g} s), "
            f"adoption {got['adoption']:.2f} s wall "
            f"({got['adoption'] / count * 1000:.0f} ms a kernel)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args()
    asyncio.run(main_async(args.counts))


if __name__ == "__main__":
    main()

"""Execute round trip through our paramiko SSH tunnel vs a direct connection.

One kernel of this machine, one throwaway sshd on 127.0.0.1 (``tests/engines/sshd.py``):
a direct client and a client of the five tunnelled ports take turns, in batches, so both
see the same load; the medians and their ratio are printed (goal <= 1.5). Also prints,
for information, start-to-kernel_info of an SSH-provisioner kernel against a local one.
Run: ``python benchmarks/bench_ssh.py [--rounds 10] [--batch 20] [--starts 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LOCAL_ARGV, kernelspecs, report, round_trips, start_to_kernel_info
from provisioners.connection.tunnels import KERNEL_PORT_NAMES, KernelTunnels
from tests.engines.sshd import LoopbackSSHD

GOAL = 1.5


async def _client(info: dict[str, Any]) -> AsyncKernelClient:
    client = AsyncKernelClient()
    client.load_connection_info(info)
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    return client


async def execute_round_trip(sshd: LoopbackSSHD, rounds: int, batch: int) -> bool:
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel()
    tunnels = KernelTunnels(
        f"{sshd.user}@{sshd.host}:{sshd.port}",
        key_file=str(sshd.user_key_path),
        known_hosts=str(sshd.known_hosts_path),
        name="bench",
    )
    clients: list[AsyncKernelClient] = []
    try:
        info = km.get_connection_info()
        ports = await tunnels.open(info["ip"], {n: info[n] for n in KERNEL_PORT_NAMES})
        direct = await _client(info)
        clients.append(direct)
        tunnelled = await _client(dict(info, ip="127.0.0.1", **ports))
        clients.append(tunnelled)
        for client in clients:  # warm both paths
            await round_trips(client, batch)
        samples: dict[str, list[float]] = {"direct": [], "tunnel": []}
        for _ in range(rounds):
            samples["direct"] += await round_trips(direct, batch)
            samples["tunnel"] += await round_trips(tunnelled, batch)
        ours = statistics.median(samples["tunnel"]) * 1000
        baseline = statistics.median(samples["direct"]) * 1000
        return report(
            f"execute round trip, SSH tunnel vs direct ({rounds * batch} each)",
            ours,
            baseline,
            GOAL,
            unit="ms",
        )
    finally:
        for client in clients:
            client.stop_channels()
        await tunnels.close()
        await km.shutdown_kernel(now=True)


async def ssh_kernel_start(sshd: LoopbackSSHD, starts: int) -> None:
    """Start-to-kernel_info of the SSH target (informational: no goal)."""
    remote = Path(tempfile.mkdtemp(prefix="cp-bench-remote-"))
    config = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "key_file": str(sshd.user_key_path),
        "ssh_known_hosts": str(sshd.known_hosts_path),
        "remote_runtime_dir": str(remote),
    }
    ksm = kernelspecs(
        {
            "ssh": ("cluster-ssh-provisioner", config, LOCAL_ARGV),
            "local": ("cluster-local-provisioner", {}, LOCAL_ARGV),
        }
    )
    samples: dict[str, list[float]] = {"ssh": [], "local": []}
    for _ in range(starts):
        for name in samples:
            samples[name].append(await start_to_kernel_info(ksm, name))
    ssh, local = (statistics.median(samples[n]) for n in ("ssh", "local"))
    print(
        f"kernel start to kernel_info (median of {starts}): SSH target {ssh:.3f} s, "
        f"local target {local:.3f} s (information only)"
    )


async def run(rounds: int = 10, batch: int = 20, starts: int = 3) -> bool:
    with (
        tempfile.TemporaryDirectory(prefix="cp-bench-sshd-") as workdir,
        LoopbackSSHD(workdir) as sshd,
    ):
        met = await execute_round_trip(sshd, rounds, batch)
        if starts:
            await ssh_kernel_start(sshd, starts)
        return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating batches per path")
    parser.add_argument("--batch", type=int, default=20, help="execute requests per batch")
    parser.add_argument("--starts", type=int, default=3, help="kernel starts per target")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.batch, args.starts))


if __name__ == "__main__":
    main()

"""A minimal "server" process for fault tests: starts kernels, reports them, waits.

    python -m tests.faults.server KERNEL_DIR KERNEL_NAME COUNT [independent]

Prints one JSON line per kernel (kernel id, provisioner info) once all are ready, then
``ready``. On SIGTERM it shuts its kernels down and exits 0; a SIGKILL leaves them
behind, which is what the orphan tests need. With ``independent``, local kernels are
started without ``JPY_PARENT_PID``, so they outlive this process (the reattach tests).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


async def start_one(ksm: KernelSpecManager, name: str, independent: bool) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    # an independent kernel prints how to connect to it: keep that off our report lines
    extra = {"independent": True, "stdout": subprocess.DEVNULL} if independent else {}
    await km.start_kernel(**extra)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
    finally:
        kc.stop_channels()
    return km


async def main(kernel_dir: str, name: str, count: int, independent: bool = False) -> None:
    ksm = KernelSpecManager(kernel_dirs=[kernel_dir])
    managers = await asyncio.gather(*(start_one(ksm, name, independent) for _ in range(count)))
    for km in managers:
        info = await km.provisioner.get_provisioner_info()
        print(json.dumps({"kernel_id": km.kernel_id, "info": info}), flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(km.shutdown_kernel() for km in managers))


if __name__ == "__main__":
    independent = sys.argv[4:5] == ["independent"]
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), independent))

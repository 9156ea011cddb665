"""A minimal "server" process for fault tests: starts kernels, reports them, waits.

    python -m tests.faults.server KERNEL_DIR KERNEL_NAME COUNT

Prints one JSON line per kernel (kernel id, provisioner info) once all are ready, then
``ready``. On SIGTERM it shuts its kernels down and exits 0; a SIGKILL leaves them
behind, which is what the orphan tests need.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager


async def start_one(ksm: KernelSpecManager, name: str) -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
    finally:
        kc.stop_channels()
    return km


async def main(kernel_dir: str, name: str, count: int) -> None:
    ksm = KernelSpecManager(kernel_dirs=[kernel_dir])
    managers = await asyncio.gather(*(start_one(ksm, name) for _ in range(count)))
    for km in managers:
        info = await km.provisioner.get_provisioner_info()
        print(json.dumps({"kernel_id": km.kernel_id, "info": info}), flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(km.shutdown_kernel() for km in managers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

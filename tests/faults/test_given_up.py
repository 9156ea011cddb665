"""A kernel the restarter gives up on leaves nothing behind (issue 21's first bug).

A kernel that dies again at every restart makes jupyter_client's restarter give up and
fire its 'dead' callbacks; Jupyter Server then drops the kernel from its map and never
cleans it up. The provisioner hears the same callback and removes what is left at once:
the exited container or process, the port records and the connection file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets.config import Config

from tests.helpers import LEFTOVER_WAIT, execute, wait_for_no_leftovers, write_kernelspec
from tests.helpers.pool import our_port_records
from tests.targets import TargetCase

#: Runs ipykernel; while the marker file exists, the kernel dies 1.5 s after it starts
#: (after its start succeeded: the restarter, not the start, sees it die).
_DIE_IF_MARKED = (
    "import os, threading\n"
    "if os.path.exists({marker!r}): threading.Timer(1.5, os._exit, (3,)).start()\n"
    "from ipykernel.kernelapp import launch_new_instance\n"
    "launch_new_instance()\n"
)


def _dying_spec(target: TargetCase, host_dir: Path) -> tuple[list[str], dict[str, Any], Path]:
    """argv and config of a kernel that dies soon after each start while a marker file
    exists."""
    config = dict(target.config)
    seen_dir = str(host_dir)
    if target.name == "docker":
        seen_dir = "/marker"
        config["volumes"] = [f"{host_dir}:/marker:ro"]
    argv = [target.argv[0], "-c", _DIE_IF_MARKED.format(marker=f"{seen_dir}/die"), "-f"]
    return [*argv, "{connection_file}"], config, host_dir / "die"


@pytest.mark.parametrize("target", ["local", "docker"], indirect=True)
async def test_a_kernel_the_restarter_gives_up_on_is_removed(
    target: TargetCase, tmp_path: Path
) -> None:
    marker_dir = tmp_path / "marker"
    marker_dir.mkdir()
    argv, config, marker = _dying_spec(target, marker_dir)
    ksm = write_kernelspec(tmp_path / "kernels", "dying", target.provisioner, config, argv=argv)
    restarter = Config({"KernelRestarter": {"restart_limit": 2, "time_to_dead": 0.5}})
    km = AsyncIOLoopKernelManager(kernel_name="dying", kernel_spec_manager=ksm, config=restarter)
    gave_up = asyncio.Event()
    await km.start_kernel()
    kernel_id = km.kernel_id
    connection_file = Path(km.connection_file)
    try:
        km.add_restart_callback(gave_up.set, "dead")
        assert (await execute(km, "print('alive')"))["stdout"] == "alive\n"
        assert our_port_records(), "the kernel's ports are recorded while it runs"
        marker.touch()  # from now on every restarted kernel dies soon
        client = km.client()
        client.start_channels()
        client.execute("import os; os._exit(1)")
        await asyncio.wait_for(gave_up.wait(), 120)
        client.stop_channels()

        async def left() -> list[str]:
            found = list(await _maybe_await(target.leftovers(kernel_id)))
            found += [f"port record {r}" for r in our_port_records()]
            runtime = Path(jupyter_runtime_dir())
            found += [f"file {p.name}" for p in runtime.glob(f"kernel-{kernel_id}*")]
            if connection_file.exists():
                found.append(f"connection file {connection_file}")
            return found

        await wait_for_no_leftovers(left, f"the given-up {target.name} kernel", LEFTOVER_WAIT)
    finally:
        km.stop_restarter()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    listed = json.dumps(await km.provisioner.list_kernels()) if km.provisioner else "[]"
    assert kernel_id not in listed


async def _maybe_await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value

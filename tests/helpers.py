"""Shared test helpers: kernelspecs on disk, running code on a kernel, engine policy."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

KERNEL_TEST_IMAGE = os.environ.get(
    "CLUSTER_PROVISIONERS_TEST_IMAGE", "cluster-provisioners/kernel-test:ipykernel-7.4"
)
LOCAL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
#: Seconds a leftover check waits for an engine to finish removing what a kernel left: a
#: real kubelet under load takes a minute or more (a pod stuck in an image pull, up to
#: 53 s measured). The check stops as soon as nothing is left.
LEFTOVER_WAIT = float(os.environ.get("CLUSTER_PROVISIONERS_LEFTOVER_WAIT", "120"))
CONTAINER_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def engine_required(engine: str) -> bool:
    """True when a missing ``engine`` must fail the run: always under CI, or when
    ``CLUSTER_PROVISIONERS_REQUIRE_<ENGINE>=1`` is set."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return True
    return os.environ.get(f"CLUSTER_PROVISIONERS_REQUIRE_{engine.upper()}", "") == "1"


def skip_or_fail(engine: str, reason: str) -> None:
    """Skip with ``reason``, or fail where the engine is required (CI)."""
    if engine_required(engine):
        pytest.fail(f"{engine} is required here (CI) but unavailable: {reason}")
    pytest.skip(f"{engine} unavailable: {reason}")


def write_kernelspec(
    directory: Path,
    name: str,
    provisioner: str,
    config: dict[str, Any] | None = None,
    *,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    interrupt_mode: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> KernelSpecManager:
    """Write ``directory/name/kernel.json`` selecting ``provisioner`` with ``config``
    (``metadata``: more kernelspec metadata, e.g. ``supported_encryption``)."""
    spec: dict[str, Any] = {
        "argv": argv or LOCAL_ARGV,
        "display_name": name,
        "language": "python",
        "metadata": {
            **(metadata or {}),
            "kernel_provisioner": {"provisioner_name": provisioner, "config": config or {}},
        },
    }
    if env:
        spec["env"] = env
    if interrupt_mode:
        spec["interrupt_mode"] = interrupt_mode
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(directory)])


async def execute(
    kernel: AsyncKernelManager | AsyncKernelClient | dict[str, Any],
    code: str,
    timeout: float = 60,
) -> dict[str, Any]:
    """Run ``code`` on a kernel; return stdout, stderr, the reply status and error.

    ``kernel`` is a kernel manager, a client not started yet (``km.client(...)``), or
    connection info (key as bytes or text) of a kernel this process did not start: its
    client then judges liveness by heartbeat.
    """
    if isinstance(kernel, AsyncKernelClient):
        kc = kernel
    elif isinstance(kernel, dict):
        info = dict(kernel)
        if isinstance(info.get("key"), str):
            info["key"] = info["key"].encode()
        kc = AsyncKernelClient()
        kc.load_connection_info(info)
        # its first heartbeat verdict comes after time_to_dead (1 s): leave a kernel
        # still starting on a loaded machine time to bind
        kc.hb_channel.time_to_dead = 10.0
    else:
        kc = kernel.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        out: dict[str, Any] = {"stdout": "", "stderr": "", "error": None}

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out[content["name"]] += content["text"]
            elif msg["msg_type"] == "error":
                out["error"] = content["ename"]

        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        out["status"] = reply["content"]["status"]
        return out
    finally:
        kc.stop_channels()


async def interrupt_busy_loop(km: AsyncKernelManager, settle: float = 0.5) -> None:
    """Run ``while True: pass``, interrupt it through ``km``, expect KeyboardInterrupt."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        msg_id = kc.execute("while True: pass")
        await asyncio.sleep(settle)
        await km.interrupt_kernel()
        reply = await kc._async_get_shell_msg(timeout=20)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = await kc._async_get_shell_msg(timeout=20)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()


#: Counts printed at the end of the run: {(what, target): n}.
SUITE_COUNTS: dict[tuple[str, str], int] = {}


def count(what: str, target: str, n: int = 1) -> None:
    """Add ``n`` to the end-of-run summary line for ``what`` on ``target``."""
    SUITE_COUNTS[(what, target)] = SUITE_COUNTS.get((what, target), 0) + n


async def reattached_manager(km: AsyncKernelManager, info: dict[str, Any]) -> AsyncKernelManager:
    """A fresh manager adopting a Docker kernel from ``info`` (``get_provisioner_info``),
    as another server process would: it checks the kernel runs, and returns the manager."""
    from provisioners.docker import DockerClusterProvisioner

    fresh = DockerClusterProvisioner(
        kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, image=KERNEL_TEST_IMAGE
    )
    await fresh.load_provisioner_info(info)
    assert await fresh.poll() is None
    adopted = AsyncKernelManager(
        kernel_name=km.kernel_name, kernel_spec_manager=km.kernel_spec_manager
    )
    adopted.kernel_id = km.kernel_id
    adopted.provisioner = fresh
    adopted.load_connection_info(fresh.connection_info)
    return adopted


async def wait_for_no_leftovers(
    probe: Callable[[], Any], what: str, timeout: float = LEFTOVER_WAIT
) -> None:
    """Poll ``probe()`` (what is left, as described names; it may be a coroutine
    function) until it finds nothing; fail after ``timeout`` s, saying what ``what`` it
    waited for, how long, and what was still there (with its state, as the probe says)."""
    started = time.monotonic()
    while True:
        left = probe()
        if inspect.isawaitable(left):
            left = await left
        if not left:
            return
        waited = time.monotonic() - started
        if waited >= timeout:
            found = "\n  ".join(str(item) for item in left)
            raise AssertionError(
                f"waited {waited:.0f} s for the removal of {what}; still left:\n  {found}"
            )
        await asyncio.sleep(0.25)

"""Kubernetes kernels through the port-forward, for synchronous and asynchronous callers.

jupyter_client's synchronous ``KernelManager`` runs its event loop only during a call,
and a blocking client never runs one: the port-forward's relays and the pod reflector
must keep running between calls, on the engine's own loop (``provisioners.k8s.loop``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager

from provisioners import KernelManager
from provisioners.connection.files import PORT_NAMES
from provisioners.connection.ports import ClusterPortCache, port_is_listening
from provisioners.k8s.client import KubeClient
from provisioners.k8s.loop import THREAD_NAME, EngineLoop
from tests.helpers import KUBERNETES_PROVISIONER, Kube, write_kernelspec
from tests.helpers.kube import no_leftovers

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

T = TypeVar("T")


def in_thread(fn: Callable[[], T], timeout: float = 200) -> T:
    """Run ``fn`` in a fresh thread (no event loop of pytest's around) and return its result."""
    out: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def main() -> None:
        try:
            out.put((True, fn()))
        except BaseException as exc:
            out.put((False, exc))

    threading.Thread(target=main, name="sync-caller", daemon=True).start()
    ok, value = out.get(timeout=timeout)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def kernel_records(kernel_id: str) -> list[int]:
    """Ports the port cache still holds for ``kernel_id`` (kernel or relay records)."""
    held = ClusterPortCache.instance().held()
    return [
        port
        for ports in held.values()
        for port, record in ports.items()
        if kernel_id in str(record.get("owner", ""))
    ]


def assert_nothing_left(kube: Kube, kernel_id: str, local_ports: list[int]) -> None:
    """No pod or Secret of ours, no relay listening, no engine thread, no port record."""

    async def pods_and_secrets() -> None:
        client = await KubeClient.connect(kube.kubeconfig)
        try:
            await no_leftovers(client, kube.namespace, kernel_id)
        finally:
            await client.close()

    asyncio.run(pods_and_secrets())
    assert [p for p in local_ports if port_is_listening("127.0.0.1", p)] == []
    deadline = time.monotonic() + 5
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_threads() == [], f"engine loop still held by {len(EngineLoop.holders())}"
    assert kernel_records(kernel_id) == []


def run_code(kc: BlockingKernelClient, code: str, timeout: float = 30) -> dict[str, Any]:
    """Execute ``code`` with a blocking client; its reply status and stdout."""
    out: dict[str, Any] = {"stdout": ""}

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out["stdout"] += msg["content"]["text"]

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    out["status"] = reply["content"]["status"]
    return out


@pytest.fixture
def sync_kernelspec(tmp_path: Path, kube: Kube) -> Iterator[Callable[..., Any]]:
    """Writes a port-forward kernelspec; returns its KernelSpecManager and name."""

    def make(name: str = "k8s-sync", **config: Any) -> Any:
        config = kube.config(connection_mode="port-forward", **config)
        return write_kernelspec(
            tmp_path / "kernels", name, KUBERNETES_PROVISIONER, config, **kube.spec()
        )

    yield make


def test_blocking_client_through_the_port_forward(
    kube: Kube, sync_kernelspec: Callable[..., Any]
) -> None:
    """Start, execute, interrupt a busy loop, restart and shut down, all synchronously."""
    ksm = sync_kernelspec()

    def scenario() -> tuple[str, list[int]]:
        km = KernelManager(kernel_name="k8s-sync", kernel_spec_manager=ksm)
        km.start_kernel()
        try:
            info = km.get_connection_info()
            assert info["ip"] == "127.0.0.1"
            local_ports = [int(info[n]) for n in PORT_NAMES]
            kc = km.blocking_client()
            kc.start_channels()
            try:
                kc.wait_for_ready(timeout=60)
                result = run_code(kc, "x = 6 * 7; print(x)")
                assert result == {"stdout": "42\n", "status": "ok"}
                time.sleep(1.0)  # idle between calls: nothing runs the caller's loop
                assert run_code(kc, "print('still', x)")["stdout"] == "still 42\n"

                msg_id = kc.execute("while True: pass")
                time.sleep(1.0)
                started = time.monotonic()
                km.interrupt_kernel()
                reply = kc.get_shell_msg(timeout=30)
                while reply["parent_header"].get("msg_id") != msg_id:
                    reply = kc.get_shell_msg(timeout=30)
                assert reply["content"]["ename"] == "KeyboardInterrupt"
                assert time.monotonic() - started < 15

                km.restart_kernel()
                kc.wait_for_ready(timeout=60)
                assert run_code(kc, "print('x' in globals())")["stdout"] == "False\n"
            finally:
                kc.stop_channels()
        finally:
            km.shutdown_kernel()
        return km.kernel_id or "", local_ports

    kernel_id, local_ports = in_thread(scenario)
    assert_nothing_left(kube, kernel_id, local_ports)


async def _async_kernel(ksm: Any, name: str, code: str, idle: float) -> tuple[str, str]:
    """Start a kernel with an AsyncKernelManager; run ``code`` with a blocking client
    called straight from this loop (blocking it), then an async client."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel()
    try:
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)  # blocks this loop: the relays must not need it
            first = run_code(kc, code)["stdout"]
        finally:
            kc.stop_channels()
        await asyncio.sleep(idle)
        akc = km.client()
        akc.start_channels()
        try:
            await akc.wait_for_ready(timeout=60)
            reply = await akc.execute_interactive(code, timeout=30)
            assert reply["content"]["status"] == "ok"
        finally:
            akc.stop_channels()
    finally:
        await km.shutdown_kernel()
    return km.kernel_id or "", first


def test_async_managers_on_two_event_loops_at_once(
    kube: Kube, sync_kernelspec: Callable[..., Any]
) -> None:
    """Two AsyncKernelManagers, each on its own loop in its own thread, side by side;
    one shuts down while the other still runs."""
    ksm = sync_kernelspec("k8s-async")
    with ThreadPoolExecutor(2, thread_name_prefix="async-caller") as pool:
        futures = {
            tag: pool.submit(asyncio.run, _async_kernel(ksm, "k8s-async", f"print('{tag}')", idle))
            for tag, idle in (("a", 0.1), ("b", 4.0))
        }
        results = {tag: future.result(timeout=200) for tag, future in futures.items()}
    assert {tag: out for tag, (_, out) in results.items()} == {"a": "a\n", "b": "b\n"}
    for kernel_id, _ in results.values():
        assert_nothing_left(kube, kernel_id, [])

"""Shared test helpers: kernelspecs on disk, running code on a kernel, engine policy,
polling (:func:`wait_for`, :func:`async_wait_for`), the CLI, an sshd, restarts.

Helpers of one engine live beside this module: :mod:`tests.helpers.kube`,
:mod:`tests.helpers.ssh`, :mod:`tests.helpers.pool`. Test modules and conftests import
helpers from here, never from each other (``tests/core/test_layout.py``)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
REPO = Path(__file__).resolve().parents[2]

LOCAL_PROVISIONER = "cluster-local-provisioner"
DOCKER_PROVISIONER = "cluster-docker-provisioner"
SSH_PROVISIONER = "cluster-ssh-provisioner"
KUBERNETES_PROVISIONER = "cluster-kubernetes-provisioner"


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


def wait_for(
    check: Callable[[], Any], timeout: float = 5.0, what: str = "", interval: float = 0.05
) -> Any:
    """Poll ``check()`` until it returns something true, and return that. After
    ``timeout`` s: fail naming ``what``, or without ``what`` return the last (false)
    value, for ``assert wait_for(...), message``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            break
        time.sleep(interval)
    assert value or not what, f"timed out after {timeout:g} s waiting for {what}"
    return value


async def async_wait_for(
    check: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,
    what: str = "",
    interval: float = 0.05,
) -> Any:
    """:func:`wait_for` without blocking the event loop; ``check`` may be a coroutine
    function."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    assert value or not what, f"timed out after {timeout:g} s waiting for {what}"
    return value


def cli_env() -> dict[str, str]:
    """This environment, with the repository on ``PYTHONPATH`` (for ``-m tests...``
    and ``-m provisioners`` run from any directory)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m provisioners ARGS``; its result, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "provisioners", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def cleanup_cli(kernel_dir: Path) -> str:
    """``provisioners cleanup`` of ``kernel_dir``; its report (it must succeed)."""
    result = cli("cleanup", "--kernel-dir", str(kernel_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout


class ServerProcess:
    """``tests/faults/server.py`` in a subprocess: a server holding ``count`` kernels."""

    def __init__(
        self, kernel_dir: Path, name: str, count: int, *, independent: bool = False
    ) -> None:
        args = [str(kernel_dir), name, str(count)] + (["independent"] if independent else [])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.server", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.kernels: list[dict[str, Any]] = []

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        """Read the kernels it started until it says ``ready``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"server exited early ({self.proc.wait()})")
            if line.strip() == "ready":
                return self
            self.kernels.append(json.loads(line))
        raise AssertionError("server did not get ready")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        if self.proc.stdout:
            self.proc.stdout.close()
        return code


def start_sshd(workdir: Path, **kwargs: Any) -> Any:
    """A running LoopbackSSHD in ``workdir``, or skip/fail (CI) when sshd is unavailable."""
    try:
        from tests.engines.sshd import LoopbackSSHD, SSHDError
    except ImportError:  # pragma: no cover - the helper ships with the test suite
        skip_or_fail("ssh", "tests/engines/sshd.py is missing")
    try:
        return LoopbackSSHD(workdir, **kwargs)
    except (SSHDError, OSError) as exc:
        skip_or_fail("ssh", f"cannot start sshd: {exc}")
        raise


@dataclass(frozen=True)
class Kube:
    """A Kubernetes API to test against (the ``kube`` fixture: the API double, or the
    cluster of ``$KUBECONFIG``)."""

    kubeconfig: str
    namespace: str
    image: str = KERNEL_TEST_IMAGE
    #: Makes the API answer 403 to ``(verb, resource)`` until the returned object's
    #: ``lift()``; only the double has one (None on a real cluster).
    forbid: Callable[[str, str], Any] | None = None

    def config(self, **extra: Any) -> dict[str, Any]:
        """Provisioner config for a kernelspec starting kernels there."""
        config: dict[str, Any] = {
            "kubeconfig": self.kubeconfig,
            "namespace": self.namespace,
            "image": self.image,
            "fallback": "none",
            "launch_timeout": 60.0,
            "termination_grace_period": 1,
        }
        config.update(extra)
        return config

    def spec(self, **extra: Any) -> dict[str, Any]:
        """Kernelspec fields for ``kernel_manager`` (argv as the image runs it)."""
        return {"argv": list(CONTAINER_ARGV), **extra}


def bind_ports(ports: list[int]) -> list[socket.socket]:
    """Listen on ``ports`` of 127.0.0.1 (another process taking them meanwhile)."""
    held = []
    for port in ports:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        deadline = time.monotonic() + 10  # docker-proxy lets go shortly after removal
        while True:
            try:
                sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.listen()
        held.append(sock)
    return held


def take_ports_after_cleanup(
    km: AsyncKernelManager, ports: list[int] | None = None
) -> list[socket.socket]:
    """Make the provisioner's restart cleanup end with ``ports`` (default: all the
    kernel's ports) taken by another listener; the list fills with its sockets."""
    held: list[socket.socket] = []
    provisioner: Any = km.provisioner
    assert provisioner is not None
    original = provisioner.cleanup
    taken = ports if ports is not None else [int(p) for p in km.ports]

    async def cleanup(restart: bool = False) -> None:
        await original(restart=restart)
        if restart and not held:
            held.extend(bind_ports(taken))

    provisioner.cleanup = cleanup
    return held


async def restart_watching_ports(km: AsyncKernelManager, **kwargs: Any) -> set[int]:
    """Restart ``km``; every port value the manager showed meanwhile (sampled each ms)."""
    seen: set[int] = set()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.update(km.ports)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        await km.restart_kernel(**kwargs)
    finally:
        done.set()
        await sampler
    return seen | set(km.ports)


def restart_with_a_blocking_client(
    ksm: KernelSpecManager,
    name: str,
    kernel_address: Callable[[Any], Any],
    before_restart: Callable[[Any], None] | None = None,
) -> Any:
    """Start kernelspec ``name`` with a synchronous KernelManager (its loop runs only
    during its calls) and restart it under a blocking client that keeps its channels, idle
    between calls (``before_restart(km)`` runs just before the restart). The client's
    address must be kept, the kernel's own (``kernel_address(km)``) must change, the client
    must get its replies afterwards, and no local relay may listen once the kernel is shut
    down. Returns the manager, shut down."""
    from provisioners import KernelManager
    from provisioners.connection.ports import port_is_listening
    from provisioners.lifecycle.engine import PORT_NAMES

    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    try:
        before = km.get_connection_info()
        assert before["ip"] == "127.0.0.1", before
        address = kernel_address(km)
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            assert kc.execute_interactive("x = 1", timeout=30)["content"]["status"] == "ok"
            time.sleep(1.0)  # idle between calls: nothing runs the caller's loop
            if before_restart is not None:
                before_restart(km)
            km.restart_kernel()
            after = km.get_connection_info()
            kept = ("ip", *PORT_NAMES)
            assert {n: after[n] for n in kept} == {n: before[n] for n in kept}
            assert kernel_address(km) != address
            reply = kc.execute_interactive("print('x' in globals())", timeout=60)
            assert reply["content"]["status"] == "ok", reply
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel()
    local = [int(before[n]) for n in PORT_NAMES]
    assert [p for p in local if port_is_listening("127.0.0.1", p)] == []
    return km

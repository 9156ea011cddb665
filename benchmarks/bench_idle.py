"""The cost of an idle kernel in the server process: Docker kernels vs LocalProvisioner.

By default, in a real Jupyter Server: a ``jupyter_server`` subprocess serves one
kernelspec of each kind (a fresh server per kind, one after the other), N kernels are
started through ``POST /api/kernels`` (in batches) and left idle under the server's own
restarters (they poll every kernel every 3 s). Measured on the SERVER process (psutil on
its pid), per kernel as its growth divided by N: fds, sockets (unix sockets apart:
connections to dockerd), threads and RSS; then its CPU while the N kernels sit idle, over
``--windows`` windows of ``--seconds`` each (and dockerd's), and, as its floor, the same
server's CPU over one window before its kernels. At the end every kernel must
answer a ``kernel_info_request`` over a websocket of its own, ``GET /api/kernels`` must
list N kernels all ``idle``, and a sample runs code; after ``DELETE`` of each, no kernel,
kernel process or container of the run is left. Both kinds are printed with their ratio.

``--in-process`` measures the same in this process instead: one ``AsyncMultiKernelManager``
with jupyter_client's restarter (``AsyncIOLoopKernelManager``, as Jupyter Server uses).

Run: ``python benchmarks/bench_idle.py [--count 100] [--seconds 30] [--in-process]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import LOCAL_ARGV, kernelspecs
from provisioners.docker.daemon import LABEL_KERNEL_ID, LABEL_MANAGED_BY, MANAGED_BY
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, write_kernelspec
from tests.jupyter_server import JupyterServer, message, run_code, ws_request

#: Kernels started at once while filling up.
START_BATCH = 10
#: Seconds after the last start before measuring (first restarter polls, settling).
SETTLE = 8.0


@dataclass
class Usage:
    """What this process holds."""

    fds: float
    sockets: float
    unix: float
    threads: float
    rss_mb: float


def usage(pid: int | None = None) -> Usage:
    """The open fds, sockets, unix sockets, threads and RSS of process ``pid`` (default:
    this one) now."""
    where = f"/proc/{pid or 'self'}/fd"
    with open("/proc/net/unix") as table:
        next(table)
        unix_inodes = {line.split()[6] for line in table if len(line.split()) > 6}
    fds = sockets = unix = 0
    for fd in os.listdir(where):
        try:
            link = os.readlink(f"{where}/{fd}")
        except OSError:
            continue
        fds += 1
        if link.startswith("socket:["):
            sockets += 1
            unix += link[8:-1] in unix_inodes
    process = psutil.Process(pid)
    return Usage(fds, sockets, unix, process.num_threads(), process.memory_info().rss / 2**20)


def _dockerd() -> psutil.Process | None:
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "dockerd":
            return process
    return None


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


async def measure(kernel_name: str, count: int, seconds: float, ksm: object) -> dict[str, Any]:
    """Per-kernel usage of ``count`` idle kernels of ``kernel_name``, and idle CPU %."""
    mkm = AsyncMultiKernelManager(
        kernel_spec_manager=ksm,
        kernel_manager_class="jupyter_client.ioloop.AsyncIOLoopKernelManager",
        connection_dir=tempfile.mkdtemp(prefix="cp-bench-idle-"),  # not the cwd
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    extra = quiet if kernel_name.endswith("local") else {}
    # one kernel started and stopped first: imports and caches are not counted
    await mkm.shutdown_kernel(await mkm.start_kernel(kernel_name=kernel_name, **extra), now=True)
    gc.collect()
    before = usage()
    started = time.perf_counter()
    try:
        for first in range(0, count, START_BATCH):
            batch = range(first, min(count, first + START_BATCH))
            await asyncio.gather(
                *(mkm.start_kernel(kernel_name=kernel_name, **extra) for _ in batch)
            )
        start_seconds = time.perf_counter() - started
        await asyncio.sleep(SETTLE)
        gc.collect()
        after = usage()
        me, dockerd = psutil.Process(), _dockerd()
        cpu0, daemon0, t0 = _cpu_seconds(me), _cpu_seconds(dockerd), time.perf_counter()
        await asyncio.sleep(seconds)
        wall = time.perf_counter() - t0
        cpu = [(_cpu_seconds(me) - cpu0) / wall * 100]
        daemon_cpu = [(_cpu_seconds(dockerd) - daemon0) / wall * 100]
        alive = sum([await mkm.is_alive(k) for k in mkm.list_kernel_ids()])
    finally:
        with contextlib.suppress(Exception):
            await mkm.shutdown_all(now=True)
    result: dict[str, Any] = {
        f.name: (getattr(after, f.name) - getattr(before, f.name)) / count for f in fields(Usage)
    }
    result.update(cpu=cpu, dockerd_cpu=daemon_cpu, alive=alive, start_seconds=start_seconds)
    return result


# ---------------------------------------------------------------- in a real Jupyter Server

#: The kernelspecs of the run: name -> (provisioner, config, argv).
SPECS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "idle-local": ("local-provisioner", {}, LOCAL_ARGV),
    "idle-docker": (
        "cluster-docker-provisioner",
        # no sweep: other containers of ours on this daemon are not this run's
        {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "fallback": "none"},
        CONTAINER_ARGV,
    ),
}


async def _post_kernel(server: JupyterServer, name: str) -> str:
    status, model = await asyncio.to_thread(server.request, "POST", "api/kernels", {"name": name})
    if status != 201:
        raise RuntimeError(f"POST /api/kernels {name}: {status} {model}\n{server.log()[-3000:]}")
    return str(model["id"])


async def _answers(server: JupyterServer, kernel_id: str, timeout: float = 30) -> bool:
    """True when the kernel answers a kernel_info_request over a websocket of its own."""
    from websockets.asyncio.client import connect

    session = uuid.uuid4().hex
    url, headers = server.ws_url(kernel_id, session), server.ws_headers()
    try:
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            out = await ws_request(ws, message(session, "kernel_info_request", {}), timeout)
            return out.status == "ok"
    except Exception:
        return False


def _kernel_states(server: JupyterServer, ids: set[str]) -> dict[str, int]:
    """How many of ``ids`` GET /api/kernels lists, by execution_state."""
    status, models = server.request("GET", "api/kernels")
    states: dict[str, int] = {}
    for model in models if status == 200 else []:
        if model["id"] in ids:
            states[model["execution_state"]] = states.get(model["execution_state"], 0) + 1
    return states


def _containers(ids: set[str]) -> list[str]:
    """Containers (any state) of this daemon labelled with one of these kernel ids."""
    listed = subprocess.run(
        [
            "docker",
            "ps",
            "-aq",
            "--filter",
            f"label={LABEL_MANAGED_BY}={MANAGED_BY}",
            "--format",
            f'{{{{.ID}}}} {{{{.Label "{LABEL_KERNEL_ID}"}}}}',
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    return [line.split()[0] for line in listed if line.split()[1:] and line.split()[1] in ids]


async def measure_server(name: str, count: int, seconds: float, windows: int) -> dict[str, Any]:
    """Per-kernel growth of a Jupyter Server with ``count`` idle kernels of kernelspec
    ``name``, its idle CPU % in each window, and the checks at the end."""
    provisioner, config, argv = SPECS[name]
    ids: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="cp-bench-idle-") as tmp:
        root = Path(tmp)
        write_kernelspec(root / "data" / "kernels", name, provisioner, config, argv=argv)
        # logged as a server's default, at INFO, whatever flags the test helper adds
        # (its log handler filters; at DEBUG it writes each kernel's activity)
        info = {"log_level": "INFO", "logging_config": {"handlers": {"console": {"level": "INFO"}}}}
        (root / "config").mkdir()
        (root / "config" / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": info}))
        server = JupyterServer(root, env={"JUPYTER_CONFIG_DIR": str(root / "config")})
        try:
            with server:
                assert server.proc is not None
                pid = server.proc.pid
                process = psutil.Process(pid)
                # one kernel started, answered and deleted first: imports and caches are
                # not counted (the daemon's shared client and its event stream close with
                # the last kernel, so they are: a constant in the growth, not per kernel)
                warm = await _post_kernel(server, name)
                ids.add(warm)
                assert await _answers(server, warm), "the warm-up kernel did not answer"
                await asyncio.to_thread(server.request, "DELETE", f"api/kernels/{warm}")
                await asyncio.sleep(2)
                before = usage(pid)
                dockerd = _dockerd()
                empty = await _idle_cpu(process, dockerd, seconds)  # the server's own floor
                started = time.perf_counter()
                for first in range(0, count, START_BATCH):
                    batch = range(first, min(count, first + START_BATCH))
                    ids.update(await asyncio.gather(*(_post_kernel(server, name) for _ in batch)))
                start_seconds = time.perf_counter() - started
                await asyncio.sleep(SETTLE)
                after = usage(pid)
                cpu, daemon_cpu = [], []
                for _ in range(windows):
                    server_cpu, daemon = await _idle_cpu(process, dockerd, seconds)
                    cpu.append(server_cpu)
                    daemon_cpu.append(daemon)
                # every kernel answers over a websocket, then is listed idle
                kernels = ids - {warm}
                answered = 0
                for batch_ids in _batches(sorted(kernels), START_BATCH):
                    results = await asyncio.gather(*(_answers(server, k) for k in batch_ids))
                    answered += sum(results)
                await asyncio.sleep(1)
                states = await asyncio.to_thread(_kernel_states, server, kernels)
                sample = sorted(kernels)[:: max(1, count // 3)][:3]
                executed = 0
                for kernel_id in sample:
                    out = await run_code(server, kernel_id, "print(6 * 7)", timeout=30)
                    executed += out["status"] == "ok" and out["stdout"].strip() == "42"
                # then each is deleted, and nothing of them is left
                deleted = time.perf_counter()
                for batch_ids in _batches(sorted(kernels), START_BATCH):
                    await asyncio.gather(
                        *(
                            asyncio.to_thread(server.request, "DELETE", f"api/kernels/{k}")
                            for k in batch_ids
                        )
                    )
                delete_seconds = time.perf_counter() - deleted
                listed_after = sum((await asyncio.to_thread(_kernel_states, server, ids)).values())
                children = len(process.children(recursive=True))
                containers_after = len(await asyncio.to_thread(_containers, ids))
                log = server.log()
        finally:
            leftovers = _containers(ids)  # only after a failure: the server removed them
            if leftovers:
                subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True, check=False)
    result: dict[str, Any] = {
        f.name: (getattr(after, f.name) - getattr(before, f.name)) / count for f in fields(Usage)
    }
    result.update(
        cpu=cpu,
        dockerd_cpu=daemon_cpu,
        empty_cpu=empty[0],
        answered=answered,
        idle=states.get("idle", 0),
        states=states,
        executed=f"{executed}/{len(sample)}",
        start_seconds=start_seconds,
        delete_seconds=delete_seconds,
        left=f"{listed_after} kernels, {children} processes, {containers_after} containers",
        restarts=log.count("AsyncIOLoopKernelRestarter: restarting kernel"),
        died=log.count("died, removing from map"),
    )
    return result


async def _idle_cpu(
    process: psutil.Process, dockerd: psutil.Process | None, seconds: float
) -> tuple[float, float]:
    """CPU % of a core of ``process`` and of dockerd over the next ``seconds``."""
    t0 = time.perf_counter()
    cpu0, daemon0 = _cpu_seconds(process), _cpu_seconds(dockerd)
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t0
    return (
        (_cpu_seconds(process) - cpu0) / wall * 100,
        (_cpu_seconds(dockerd) - daemon0) / wall * 100,
    )


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


async def server_main_async(count: int, seconds: float, windows: int) -> None:
    local = await measure_server("idle-local", count, seconds, windows)
    docker = await measure_server("idle-docker", count, seconds, windows)
    print(
        f"{count} idle kernels each in a Jupyter Server subprocess (POST /api/kernels, its "
        f"restarters polling every 3 s), idle CPU over {windows} x {seconds:g} s; "
        "the server process, per kernel:"
    )
    _table(local, docker)
    windows_text = " / ".join(
        f"{a:.2f}~{b:.2f}" for a, b in zip(local["cpu"], docker["cpu"], strict=True)
    )
    print(f"  {'idle CPU % per window':22}(LocalProvisioner~Docker) {windows_text}")
    floor = f"{local['empty_cpu']:>18.2f}{docker['empty_cpu']:>12.2f}"
    print(f"  {'CPU % with no kernel':22}{floor}    (the same server before its kernels)")
    print(
        f"  {'answer kernel_info':22}{local['answered']:>18}{docker['answered']:>12}"
        f"    (start of all: {local['start_seconds']:.0f} s, {docker['start_seconds']:.0f} s)"
    )
    print(f"  {'listed idle':22}{local['idle']:>18}{docker['idle']:>12}")
    restarts = [f"{kind['restarts']} / {kind['died']}" for kind in (local, docker)]
    print(f"  {'restarted / died':22}{restarts[0]:>18}{restarts[1]:>12}")
    print(f"  {'sample executes ok':22}{local['executed']:>18}{docker['executed']:>12}")
    print(
        f"  after DELETE of each ({local['delete_seconds']:.0f} s, "
        f"{docker['delete_seconds']:.0f} s), left: LocalProvisioner {local['left']}; "
        f"Docker {docker['left']}"
    )
    _verdict(local, docker, count)


# ---------------------------------------------------------------- both modes


def _ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base > 0.005 else f"{ours - base:+.2f}"


def _table(local: dict[str, Any], docker: dict[str, Any]) -> None:
    rows = [
        ("fds", "fds", "{:.2f}"),
        ("sockets", "sockets", "{:.2f}"),
        ("unix sockets", "unix", "{:.2f}"),
        ("threads", "threads", "{:.2f}"),
        ("RSS MB", "rss_mb", "{:.2f}"),
    ]
    print(f"  {'':22}{'LocalProvisioner':>18}{'Docker':>12}{'ratio':>10}")
    for title, key, fmt in rows:
        ours, base = docker[key], local[key]
        print(
            f"  {title + ' per kernel':22}{fmt.format(base):>18}{fmt.format(ours):>12}"
            f"{_ratio(ours, base):>10}"
        )
    cpu, base_cpu = _mean(docker["cpu"]), _mean(local["cpu"])
    print(f"  {'idle CPU % (process)':22}{base_cpu:>18.2f}{cpu:>12.2f}{_ratio(cpu, base_cpu):>10}")
    daemon = f"{_mean(local['dockerd_cpu']):>18.2f}{_mean(docker['dockerd_cpu']):>12.2f}"
    print(f"  {'idle CPU % (dockerd)':22}{daemon}")


def _verdict(local: dict[str, Any], docker: dict[str, Any], count: int) -> None:
    extra = (docker["sockets"] - local["sockets"]) * count
    print(f"  Docker sockets beyond LocalProvisioner's: {extra:.0f} in all (goal: a constant)")
    cpu = _mean(docker["cpu"])
    verdict = "ok" if cpu <= 1.0 else "OVER GOAL"
    print(f"  Docker idle CPU {cpu:.2f} % of a core (goal <= 1 %) {verdict}")


async def main_async(count: int, seconds: float) -> None:
    ksm = kernelspecs(SPECS)
    local = await measure("idle-local", count, seconds, ksm)
    docker = await measure("idle-docker", count, seconds, ksm)
    print(
        f"{count} idle kernels each, one AsyncMultiKernelManager with restarters "
        f"(poll every 3 s), idle CPU over {seconds:g} s; per kernel:"
    )
    _table(local, docker)
    print(
        f"  {'alive at the end':22}{local['alive']:>18.0f}{docker['alive']:>12.0f}"
        f"    (start of all: {local['start_seconds']:.0f} s, {docker['start_seconds']:.0f} s)"
    )
    _verdict(local, docker, count)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (needs a Docker daemon and the kernel test image)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="idle kernels of each kind")
    parser.add_argument("--seconds", type=float, default=30, help="idle CPU window")
    parser.add_argument(
        "--windows", type=int, default=2, help="idle CPU windows, one after the other (server)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="kernels of an AsyncMultiKernelManager of this process, not a Jupyter Server",
    )
    args = parser.parse_args(argv)
    if args.in_process:
        asyncio.run(main_async(args.count, args.seconds))
    else:
        asyncio.run(server_main_async(args.count, args.seconds, args.windows))


if __name__ == "__main__":
    main()

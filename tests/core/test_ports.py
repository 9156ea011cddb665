"""The cluster-aware port cache: no port handed out twice, across threads and processes.

The fixed ranges here (620xx-623xx) lie outside both the kernels' default range
(20000-29999) and Linux's ephemeral range, so no kernel of another test holds them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import (
    ClusterPortCache,
    FilePortStore,
    PortRange,
    PortSource,
    process_alive,
    process_start_time,
)
from provisioners.exceptions import PortsExhaustedError, ProvisionerConfigError


def _allocate_many(directory: str, worker: int, rounds: int, out: str, barrier: Any) -> None:
    cache = ClusterPortCache(FilePortStore(directory))
    barrier.wait(60)  # all start together
    held: list[int] = []
    for i in range(rounds):
        held += cache.allocate(5, f"w{worker}-{i}", port_range="22000-23999")
    Path(out).write_text(json.dumps(held))
    barrier.wait(60)  # all still hold their ports until every worker is done


def test_four_processes_never_share_a_port(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.json" for i in range(4)]
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_allocate_many, args=(str(tmp_path), i, 50, str(outs[i]), barrier))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ports = [port for out in outs for port in json.loads(out.read_text())]
    assert len(ports) == 4 * 50 * 5
    assert len(set(ports)) == len(ports), "a port was handed out twice while held"
    # every holder has exited, so the store reclaims all of their records
    assert FilePortStore(tmp_path).held() == {}


def test_threads_never_share_a_port(tmp_path: Path) -> None:
    cache = ClusterPortCache(FilePortStore(tmp_path))
    results: list[list[int]] = []

    def work(n: int) -> None:
        results.append(cache.allocate(5, f"t{n}", port_range="24000-24999"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ports = [p for r in results for p in r]
    assert len(ports) == 200 and len(set(ports)) == 200


def test_release_returns_ports(tmp_path: Path) -> None:
    cache = ClusterPortCache(FilePortStore(tmp_path))
    ports = cache.allocate(5, "a", port_range="62000-62004")
    assert sorted(ports) == list(range(62000, 62005))
    with pytest.raises(PortsExhaustedError, match="62000-62004"):
        cache.allocate(1, "b", port_range="62000-62004")
    assert sorted(cache.release("a")) == sorted(ports)
    assert sorted(cache.allocate(5, "b", port_range="62000-62004")) == sorted(ports)


def test_ports_of_a_sigkilled_holder_come_back(tmp_path: Path) -> None:
    code = (
        "import sys,time\n"
        "from provisioners.connection.ports import ClusterPortCache, FilePortStore\n"
        f"c = ClusterPortCache(FilePortStore({str(tmp_path)!r}))\n"
        "print(c.allocate(5, 'victim', port_range='62010-62014'), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert len(json.loads(line)) == 5
        cache = ClusterPortCache(FilePortStore(tmp_path))
        with pytest.raises(PortsExhaustedError):
            cache.allocate(1, "other", port_range="62010-62014")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert len(cache.allocate(5, "other", port_range="62010-62014")) == 5
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_engine_sources_and_bound_ports_are_skipped(tmp_path: Path) -> None:
    class Held(PortSource):
        def ports_in_use(self, host: str) -> set[int]:
            return {62020, 62021} if host == "node-a" else set()

    cache = ClusterPortCache(FilePortStore(tmp_path))
    got = cache.allocate(3, "k", host="node-a", port_range="62020-62024", sources=[Held()])
    assert set(got) == {62022, 62023, 62024}
    # on localhost a port some process is bound to is never handed out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 62100))
        sock.listen()
        got = cache.allocate(1, "k2", port_range="62100-62101")
        assert got == [62101]


@pytest.mark.parametrize("text", ["", "40000", "a-b", "50000-40000", "80-90", "1000-70000"])
def test_bad_port_ranges_are_named(text: str) -> None:
    with pytest.raises(ProvisionerConfigError, match="port_range"):
        PortRange.parse(text)


def test_a_local_kernel_outliving_its_killed_server_is_reclaimed(tmp_path: Path) -> None:
    """A server records its kernel's pid with the ports; once the server is SIGKILLed,
    the next look at the store kills that kernel if it is still running (hung)."""
    code = (
        "import subprocess, sys, time\n"
        "from provisioners.connection.ports import (\n"
        "    ClusterPortCache, FilePortStore, process_start_time)\n"
        f"c = ClusterPortCache(FilePortStore({str(tmp_path)!r}))\n"
        "c.allocate(5, 'kernel-hung', port_range='62200-62204')\n"
        "kernel = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "c.annotate('kernel-hung', kernel_pid=kernel.pid,"
        " kernel_start=process_start_time(kernel.pid))\n"
        "print(kernel.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    kernel_pid = int(server.stdout.readline())
    try:
        cache = ClusterPortCache(FilePortStore(tmp_path))
        assert cache.held()["localhost"]  # server alive: records and kernel kept
        os.kill(kernel_pid, 0)
        server.kill()
        server.wait(10)
        assert cache.held() == {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{kernel_pid}") or _zombie(kernel_pid):
                break
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{kernel_pid}") or _zombie(kernel_pid)
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(kernel_pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_records_of_another_machine_are_never_reclaimed_here(tmp_path: Path) -> None:
    """A runtime dir shared by several machines (NFS homes): another machine's records
    name pids this machine cannot check. They are neither reclaimed nor handed out, and
    that machine's connection file stays; this machine's dead records are reclaimed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = {
        "localhost": {
            str(port): {"owner": owner, "hostname": host, "pid": dead.pid, "start": "1", "t": 0}
            for port, owner, host in [
                *((p, "kernel-elsewhere", "another-machine") for p in range(62300, 62305)),
                *((p, "kernel-ours", socket.gethostname()) for p in range(62305, 62310)),
            ]
        }
    }
    (tmp_path / "cluster-provisioners-ports.json").write_text(json.dumps(store))
    for owner in ("kernel-elsewhere", "kernel-ours"):
        (tmp_path / f"{owner}.json").write_text("{}")
    cache = ClusterPortCache(FilePortStore(tmp_path))
    got = cache.allocate(5, "kernel-new", port_range="62300-62309", check_local_bind=False)
    assert sorted(got) == list(range(62305, 62310))
    held = cache.held("localhost")["localhost"]
    assert {p for p, r in held.items() if r["owner"] == "kernel-elsewhere"} == set(
        range(62300, 62305)
    )
    assert all(r["hostname"] == socket.gethostname() for p, r in held.items() if p in got)
    assert (tmp_path / "kernel-elsewhere.json").exists()
    assert not (tmp_path / "kernel-ours.json").exists()
    with pytest.raises(PortsExhaustedError):
        cache.allocate(1, "kernel-more", port_range="62300-62309", check_local_bind=False)


def test_a_zombie_holder_is_not_alive(tmp_path: Path) -> None:
    """A holder that ended but is not reaped yet (a zombie) holds nothing."""
    holder = subprocess.Popen(["true"])
    try:
        start = process_start_time(holder.pid)
        deadline = time.monotonic() + 10
        while not _zombie(holder.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _zombie(holder.pid)
        assert not process_alive(holder.pid, start)
        assert not process_alive(holder.pid, "")
        assert process_alive(os.getpid(), process_start_time(os.getpid()))
    finally:
        holder.wait()

"""What the e2e tests share: run.sh's environment, kubectl and helm, and a port-forward
of the chart's server."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.jupyter_server import http

ENV = {
    name: os.environ.get(f"E2E_{name}", "")
    for name in (
        "KUBECONFIG",
        "KUBECTL",
        "HELM",
        "CHART",
        "NAMESPACE",
        "RELEASE",
        "TOKEN",
        "SERVER_IMAGE",
        "IMAGE_IMPORT",
        "HELM_ARGS",
        "KERNEL_NAMESPACE",
    )
}
MISSING = [name for name in ("KUBECONFIG", "KUBECTL", "HELM", "CHART", "TOKEN") if not ENV[name]]
FULLNAME = (
    ENV["RELEASE"]
    if "cluster-provisioners" in ENV["RELEASE"]
    else f"{ENV['RELEASE']}-cluster-provisioners"
)


def kubectl(*args: str, check: bool = True, timeout: float = 300) -> str:
    proc = subprocess.run(
        [ENV["KUBECTL"], "-n", ENV["NAMESPACE"], *args],
        env={**os.environ, "KUBECONFIG": ENV["KUBECONFIG"]},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def helm_upgrade(*sets: str) -> None:
    args = [
        ENV["HELM"],
        "upgrade",
        ENV["RELEASE"],
        ENV["CHART"],
        "-n",
        ENV["NAMESPACE"],
        "--reuse-values",
        "--wait",
        "--timeout",
        "5m",
        *shlex.split(ENV["HELM_ARGS"]),
    ]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.run(
        args,
        env={**os.environ, "KUBECONFIG": ENV["KUBECONFIG"]},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr


def server_pod() -> dict[str, Any]:
    pods = json.loads(
        kubectl("get", "pods", "-l", "app.kubernetes.io/component=server", "-o", "json")
    )["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    return live[0]


class Forward:
    """`kubectl port-forward` of the server's Service on one local port, restarted after
    each disruption (a port-forward ends with the pod it picked)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.stop()
        self.proc = subprocess.Popen(
            [
                ENV["KUBECTL"],
                "-n",
                ENV["NAMESPACE"],
                "port-forward",
                f"service/{FULLNAME}",
                f"{self.port}:8888",
            ],
            env={**os.environ, "KUBECONFIG": ENV["KUBECONFIG"]},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            status, raw = http(method, self.url + path, ENV["TOKEN"], body, timeout=10)
        except OSError:
            return 0, None
        return status, json.loads(raw) if raw else None

    def watch(self) -> None:
        """In a thread: ask ``GET /api/kernels`` every 0.25 s, recording each answer's
        time; restart the port-forward while the server does not answer."""
        self.answers: list[float] = []
        self.watching = True

        def loop() -> None:
            while self.watching:
                try:
                    if self.proc is None or self.proc.poll() is not None:
                        self.start()
                    status, _ = self.request("GET", "/api/kernels")
                except Exception:  # a half-started server's answer: not an answer
                    status = -1
                if status == 200:
                    self.answers.append(time.monotonic())
                elif status == 0:
                    with contextlib.suppress(Exception):
                        self.start()
                time.sleep(0.25)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time between ``since`` and ``until`` without an answer from the
        server (``until``: when it listed every kernel again)."""
        times = [t for t in self.answers if since <= t <= until]
        before = [t for t in self.answers if t < since]
        times = [before[-1] if before else since, *times, until]
        return max(b - a for a, b in itertools.pairwise(times))

    def wait_for_warm_kernel(self, kernelspec: str, timeout: float = 300) -> None:
        """Return once the server's pool of ``kernelspec`` holds a ready warm kernel."""
        ready = f'cluster_provisioners_pool_kernels{{kernelspec="{kernelspec}",state="ready"}}'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, raw = http("GET", self.url + "/metrics", ENV["TOKEN"], timeout=10)
            except OSError:
                status, raw = 0, b""
            lines = raw.decode(errors="replace").splitlines() if status == 200 else []
            if any(line.startswith(ready) and not line.endswith(" 0.0") for line in lines):
                return
            time.sleep(1)
        raise AssertionError(f"no warm {kernelspec} kernel within {timeout:g} s")

    def wait_for_kernels(self, ids: set[str], timeout: float = 300) -> None:
        """Return once the server lists every kernel of ``ids``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, kernels = self.request("GET", "/api/kernels")
            if status == 200 and ids <= {k["id"] for k in kernels}:
                return
            time.sleep(0.25)
        raise AssertionError(f"the server did not list kernels {ids} within {timeout:g} s")

"""Without a reachable API: the local fallback, and the pure parts of the stream protocols."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from jupyter_client.manager import AsyncKernelManager

from provisioners.exceptions import EngineUnavailableError
from provisioners.k8s.client import KubeApiError
from provisioners.k8s.portforward import _Deframer, _exit_code
from tests.helpers import KUBERNETES_PROVISIONER, execute

pytestmark = pytest.mark.k8s


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_kubeconfig(tmp_path: Path) -> str:
    """A kubeconfig whose API server address answers nothing."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{closed_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def test_unreachable_api_is_an_engine_error_without_fallback(
    tmp_path: Path, kernel_manager: Callable[..., AsyncKernelManager]
) -> None:
    config = {"kubeconfig": dead_kubeconfig(tmp_path), "image": "x", "fallback": "none"}
    km = kernel_manager(KUBERNETES_PROVISIONER, config)
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError, match="unreachable"):
        await km.start_kernel()
    assert time.monotonic() - started < 10


async def test_unreachable_api_falls_back_to_a_local_kernel(
    tmp_path: Path, kernel_manager: Callable[..., AsyncKernelManager]
) -> None:
    config = {"kubeconfig": dead_kubeconfig(tmp_path), "image": "x", "fallback": "local"}
    km = kernel_manager(KUBERNETES_PROVISIONER, config)
    await km.start_kernel()
    assert km.provisioner.engine.target == "local"
    assert (await execute(km, "print('local')"))["stdout"] == "local\n"
    await km.shutdown_kernel()


def test_portforward_frames_drop_each_channels_port_prefix() -> None:
    frames = _Deframer()
    port = (20001).to_bytes(2, "little")
    assert frames.feed(b"\x00" + port) == (0, b"")
    assert frames.feed(b"\x01" + port[:1]) == (1, b"")  # a prefix split across frames
    assert frames.feed(b"\x01" + port[1:] + b"oops") == (1, b"oops")
    assert frames.feed(b"\x00" + port) == (0, port)  # later frames are all data
    assert frames.feed(b"") == (-1, b"")


def test_exec_status_gives_the_exit_code() -> None:
    assert _exit_code(b"") == 0
    assert _exit_code(json.dumps({"status": "Success"}).encode()) == 0
    failure = {
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "message": "command terminated with non-zero exit code",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    assert _exit_code(json.dumps(failure).encode()) == 3
    with pytest.raises(KubeApiError, match="not found"):
        _exit_code(json.dumps({"status": "Failure", "message": "exec: not found"}).encode())

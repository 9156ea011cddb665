"""A failed local start through a real Jupyter Server: the cause reaches the client, and
the server still shuts down cleanly (issue 11, part 3)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect

from tests.helpers import LOCAL_ARGV, write_kernelspec
from tests.jupyter_server import JupyterServer, ws_execute

LOCAL = "cluster-local-provisioner"

#: kernelspec name -> (provisioner config, argv, HTTP status, words the reply must hold)
FAILING = {
    "no-binary": (
        {},
        ["/nonexistent/kernel-binary", "-f", "{connection_file}"],
        500,
        ["/nonexistent/kernel-binary", "No such file or directory"],
    ),
    "bad-key": ({"no_such_key": 1}, LOCAL_ARGV, 500, ["no_such_key", "bad-key"]),
    "no-ports": ({"port_range": "25000-25003"}, LOCAL_ARGV, 503, ["25000-25003"]),
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[JupyterServer]:
    with JupyterServer(tmp_path) as running:
        write_kernelspec(running.kernels, "good", LOCAL)
        for name, (config, argv, _, _) in FAILING.items():
            write_kernelspec(running.kernels, name, LOCAL, config, argv=argv)
        yield running


def assert_readable(reply: object, status: int, expected_status: int, words: list[str]) -> None:
    assert status == expected_status, reply
    assert isinstance(reply, dict), reply
    message = str(reply.get("message", ""))
    assert message != "Unhandled error"
    for word in words:
        assert word in message, (word, reply)


@pytest.mark.parametrize("name", sorted(FAILING))
def test_failed_start_is_explained_on_both_rest_paths(server: JupyterServer, name: str) -> None:
    _, _, expected_status, words = FAILING[name]
    status, reply = server.request("POST", "api/kernels", {"name": name})
    assert_readable(reply, status, expected_status, words)
    # JupyterLab's path: the sessions API wraps the same error in its own 500
    status, reply = server.request(
        "POST",
        "api/sessions",
        {"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": name}},
    )
    assert_readable(reply, status, 500, words)
    assert server.request("GET", "api/kernels") == (200, [])


async def test_server_shuts_down_cleanly_after_a_failed_start(server: JupyterServer) -> None:
    status, kernel = server.request("POST", "api/kernels", {"name": "good"})
    assert status == 201, kernel
    session = uuid.uuid4().hex
    async with connect(
        server.ws_url(kernel["id"], session),
        additional_headers=server.ws_headers(),
        open_timeout=30,
    ) as ws:
        pid = int((await ws_execute(ws, session, "import os; print(os.getpid())"))["stdout"])
    for name in FAILING:
        assert server.request("POST", "api/kernels", {"name": name})[0] >= 500
    # the server's own shutdown: jupyter_client kept each failed kernel pending, and
    # shutdown_all stopped at the first with 404 "Kernel does not exist"
    status, reply = server.request("POST", "api/shutdown")
    assert status in (200, 0), reply  # 0: the server was gone before it could answer
    assert server.wait_exit(60) is not None, server.log()
    log = server.log()
    assert "Kernel does not exist" not in log
    assert "Traceback" not in log.split("Shutting down")[-1], log
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(server.root / "data" / "runtime" / f"kernel-{kernel['id']}.json")

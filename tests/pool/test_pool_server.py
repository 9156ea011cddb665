"""Warm Docker pools in a real Jupyter Server: prefill at start, claims over REST and the
websocket with the claimed kernel's own key, sessions, drain at a clean stop, and the
sweep of a SIGKILLed server's warm containers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import websockets
from jupyter_core.paths import jupyter_runtime_dir

from provisioners.docker import LABEL_OWNER
from provisioners.lifecycle.owner import ServerIdentity
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, async_wait_for, write_kernelspec
from tests.helpers.pool import FILL_TIMEOUT, our_port_records, run_pooled_script, spec_containers
from tests.jupyter_server import JupyterServer, ws_execute

pytestmark = pytest.mark.docker

DOCKER = "cluster-docker-provisioner"
#: Asks the kernel for the key it signs with, and whether it sees the request's inputs.
KEY_CODE = """\
import os
from ipykernel.kernelapp import IPKernelApp
print(IPKernelApp.instance().session.key.decode())
print(os.environ.get("JPY_SESSION_NAME"))
"""


@pytest.fixture
def pool_server(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Any]:
    """A factory of Jupyter Servers prefilling a Docker pool of 2 (kernelspec ``spec``);
    at teardown every server is stopped and its kernelspec's containers are removed."""
    made: list[tuple[JupyterServer, str]] = []

    def start(root: Path, spec: str, pool_size: int = 2, extension: bool = True) -> JupyterServer:
        server = JupyterServer(root, env={"JUPYTER_CONFIG_DIR": str(root / "config")})
        config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False}
        for name, size in ((spec, pool_size), (f"{spec}-cold", 0)):
            write_kernelspec(
                server.kernels, name, DOCKER, {**config, "pool_size": size}, argv=CONTAINER_ARGV
            )
        (root / "config").mkdir(exist_ok=True)
        (root / "config" / "jupyter_server_config.json").write_text(
            json.dumps(
                {
                    "ServerApp": {
                        "jpserver_extensions": {"provisioners.pool": extension},
                        # the pools' own log lines (warm kernels ready) in the server's log
                        "logging_config": {
                            "loggers": {"provisioners": {"level": "INFO", "handlers": ["console"]}}
                        },
                    },
                    "KernelPools": {"prefill": [spec] if extension else [], "max_total": 4},
                }
            )
        )
        made.append((server, spec))
        return server.__enter__()

    yield start
    for server, spec in made:
        server.stop(signal.SIGTERM)
        for item in spec_containers(docker_client, spec):
            docker_client.api.remove_container(item["Id"], force=True, v=True)


def kernel_containers(
    client: docker.DockerClient, spec_name: str, kernel_id: str
) -> list[dict[str, Any]]:
    """The containers of ``spec_name`` named after ``kernel_id``."""
    return [c for c in spec_containers(client, spec_name) if kernel_id in c["Names"][0]]


async def warm_ready(server: JupyterServer, n: int, times: int = 1) -> None:
    """Wait for the server's log to say ``times`` times that ``n`` warm kernels are ready."""
    await async_wait_for(
        lambda: server.log().count(f"ready ({n} of {n})") >= times,
        FILL_TIMEOUT,
        f"{n} warm kernels ready in the server's log ({times} times)",
    )


async def post(server: JupyterServer, path: str, body: Any, expect: int = 201) -> Any:
    status, reply = await asyncio.to_thread(server.request, "POST", path, body)
    assert status == expect, f"POST {path}: {status} {reply!r}\n{server.log()}"
    return reply


async def test_server_prefills_claims_over_rest_and_websocket_and_drains(
    pool_server: Any, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    spec = f"srv-{uuid.uuid4().hex[:8]}"
    server = pool_server(tmp_path, spec)
    # the pool fills as the server starts, before any kernel request
    await warm_ready(server, 2)
    warm = spec_containers(docker_client, spec)
    assert len(warm) == 2 and all(c["State"] == "running" for c in warm), warm
    owner = ServerIdentity.parse(warm[0]["Labels"][LABEL_OWNER])
    assert server.proc is not None and owner is not None and owner.pid == server.proc.pid

    cold_start = time.monotonic()
    cold = await post(server, "api/kernels", {"name": f"{spec}-cold"})
    cold_time = time.monotonic() - cold_start
    claim_start = time.monotonic()
    kernel = await post(server, "api/kernels", {"name": spec})
    claim_time = time.monotonic() - claim_start
    log = server.log()
    assert f"Kernel {kernel['id']} (docker): claimed: warm kernel pool-" in log, log
    print(f"POST /api/kernels: claimed {claim_time:.3f} s, cold {cold_time:.3f} s")
    assert claim_time < 0.5 * cold_time, (claim_time, cold_time)
    # a claimed kernel published its start long ago: it is reported idle once the server
    # watches it, before any websocket (else the first one waits for a status)
    states = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "idle" not in states:
        _, model = await asyncio.to_thread(server.request, "GET", f"api/kernels/{kernel['id']}")
        states.append(model["execution_state"])
        await asyncio.sleep(0.05)
    assert states[-1] == "idle", states

    # the server's own connection file holds the warm kernel's key, and its websocket works
    info = json.loads((Path(jupyter_runtime_dir()) / f"kernel-{kernel['id']}.json").read_text())
    session = uuid.uuid4().hex
    async with websockets.connect(
        server.ws_url(kernel["id"], session), additional_headers=server.ws_headers()
    ) as ws:
        out = await ws_execute(ws, session, KEY_CODE)
        assert out["status"] == "ok", out
        assert out["stdout"] == f"{info['key']}\nNone\n", out
        # it runs in one of the containers started before the request, renamed after it
        (claimed,) = kernel_containers(docker_client, spec, kernel["id"])
        assert claimed["Id"] in {c["Id"] for c in warm}, claimed
        # a restart over REST: in place, same key, a new container; the websocket goes on,
        # and a request sent at once gets its output (iopub has reconnected)
        await post(server, f"api/kernels/{kernel['id']}/restart", None, expect=200)
        out = await ws_execute(ws, session, KEY_CODE)
        assert out["status"] == "ok", out
        assert out["stdout"] == f"{info['key']}\nNone\n", out
        (restarted,) = kernel_containers(docker_client, spec, kernel["id"])
        assert restarted["Id"] != claimed["Id"]

    # a session (JupyterLab's path): JPY_SESSION_NAME and a cwd, still claimed on Docker
    await warm_ready(server, 2, times=2)
    (tmp_path / "work").mkdir()
    model = {
        "path": "work/pooled.ipynb",
        "name": "pooled.ipynb",
        "type": "notebook",
        "kernel": {"name": spec},
    }
    session_model = await post(server, "api/sessions", model)
    session_kernel = session_model["kernel"]["id"]
    log = server.log()
    assert (
        f"Kernel {session_kernel} (docker): claimed: warm kernel pool-" in log
        and "(without JPY_SESSION_NAME)" in log
    ), log
    ws_session = uuid.uuid4().hex
    async with websockets.connect(
        server.ws_url(session_kernel, ws_session), additional_headers=server.ws_headers()
    ) as ws:
        out = await ws_execute(ws, ws_session, KEY_CODE)
    assert out["status"] == "ok", out
    assert out["stdout"].endswith("\nNone\n"), out  # claimed without JPY_SESSION_NAME
    assert cold["id"] not in (kernel["id"], session_kernel)

    # a clean stop drains the pool: nothing of the server is left
    assert server.stop(signal.SIGTERM) is not None, server.log()
    left = spec_containers(docker_client, spec) + spec_containers(docker_client, f"{spec}-cold")
    assert not left, [c["Names"] for c in left]
    assert not our_port_records(server.proc.pid)
    assert "Traceback" not in server.log(), server.log()


async def test_sigkilled_server_warm_containers_are_swept(
    pool_server: Any, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    spec = f"srvkill-{uuid.uuid4().hex[:8]}"
    server = pool_server(tmp_path, spec)
    await warm_ready(server, 2)
    assert server.proc is not None
    pid = server.proc.pid
    assert our_port_records(pid)
    server.stop(signal.SIGKILL)
    left = spec_containers(docker_client, spec)
    assert len(left) == 2, left  # nothing drained them

    cleanup = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "provisioners", "cleanup", "--kernel-dir", str(server.kernels)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert cleanup.returncode == 0, cleanup.stderr
    for item in left:
        assert f"removed container {item['Id'][:12]}" in cleanup.stdout, cleanup.stdout
    assert not spec_containers(docker_client, spec)
    assert not our_port_records(pid)


#: A script: fills a pool of 2 (a kernel's first start), then exits without a drain.
EXITING = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from provisioners.pool import KernelPools

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
    await km.start_kernel()
    await km.shutdown_kernel(now=True)
    (pool,) = KernelPools.instance().pools()
    while len(pool.ready) < 2:
        await asyncio.sleep(0.1)
    print("FILLED", flush=True)

asyncio.run(main())
"""


async def test_a_process_exiting_drains_its_pools(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    spec = f"exit-{uuid.uuid4().hex[:8]}"
    try:
        done = await run_pooled_script(EXITING, tmp_path / "kernels", spec, 2)
        assert done.returncode == 0 and "FILLED" in done.stdout, done.stderr
        assert not spec_containers(docker_client, spec)  # drained at interpreter exit
    finally:
        for item in spec_containers(docker_client, spec):
            docker_client.api.remove_container(item["Id"], force=True, v=True)


@pytest.mark.parametrize("stop_at", ["server up", "container created"])
async def test_a_server_stopped_while_its_pool_fills_leaves_nothing(
    pool_server: Any, tmp_path: Path, docker_client: docker.DockerClient, stop_at: str
) -> None:
    spec = f"srvearly-{uuid.uuid4().hex[:8]}"
    server = pool_server(tmp_path, spec, pool_size=3)
    if stop_at == "container created":
        await async_wait_for(lambda: stop_at in server.log(), FILL_TIMEOUT, "a warm container")
    assert server.stop(signal.SIGTERM) is not None, server.log()
    assert server.proc is not None
    left = spec_containers(docker_client, spec)
    assert not left, ([c["Names"] for c in left], server.log())
    assert not our_port_records(server.proc.pid), server.log()
    assert "Traceback" not in server.log(), server.log()


async def test_without_the_extension_the_first_kernel_fills_and_exit_drains(
    pool_server: Any, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    spec = f"srvnoext-{uuid.uuid4().hex[:8]}"
    server = pool_server(tmp_path, spec, extension=False)
    await asyncio.sleep(1)
    assert not spec_containers(docker_client, spec)  # no pool before the first kernel
    kernel = await post(server, "api/kernels", {"name": spec})
    assert f"Kernel {kernel['id']}: cold start, no warm kernel is ready" in server.log()
    await warm_ready(server, 2)
    assert len(spec_containers(docker_client, spec)) == 3
    assert server.stop(signal.SIGTERM) is not None, server.log()
    assert server.proc is not None
    left = spec_containers(docker_client, spec)
    assert not left, ([c["Names"] for c in left], server.log())
    assert not our_port_records(server.proc.pid), server.log()

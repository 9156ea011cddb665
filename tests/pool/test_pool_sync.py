"""A warm Docker pool used by jupyter_client's synchronous ``KernelManager`` and a
blocking client, in a process of their own (no event loop runs between their calls):
the claim, code run on the claimed kernel, a restart in place, the refill, and the drain
at interpreter exit."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import docker
import pytest

from tests.helpers.pool import FILL_TIMEOUT, run_pooled_script, spec_containers

pytestmark = pytest.mark.docker

#: argv: the kernelspec dir, the kernelspec name, the fill timeout. Prints one JSON line.
SYNC_CLIENT = """
import json, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from provisioners.pool import KernelPools
from tests.helpers import wait_for

kernel_dir, spec, fill_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
ksm = KernelSpecManager(kernel_dirs=[kernel_dir])

first = KernelManager(kernel_name=spec, kernel_spec_manager=ksm)
first.start_kernel()  # the first provisioner of the kernelspec: a cold start, the pool fills
(pool,) = KernelPools.instance().pools()
wait_for(lambda: len(pool.ready) == 1, fill_timeout, "the pool to fill", 0.1)
warm_kernels, warm_ids = list(pool.ready), [warm.kernel_id for warm in pool.ready]

km = KernelManager(kernel_name=spec, kernel_spec_manager=ksm)
km.start_kernel()
runner = km.provisioner.engine
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=30)

def run(code):
    out = []
    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
    reply = kc.execute_interactive(code, output_hook=hook, timeout=30)
    return [reply["content"]["status"], "".join(out)]

result = {
    "claimed": any(runner is warm for warm in warm_kernels),
    "first_run": run("x = 6 * 7; print(x)"),
}
wait_for(lambda: len(pool.ready) == 1, fill_timeout, "the pool to refill", 0.1)
result["refilled"] = [warm.kernel_id for warm in pool.ready] != warm_ids
km.restart_kernel()
kc.wait_for_ready(timeout=60)
result["after_restart"] = run("print('x' in dir())")
result["same_kernel_id"] = km.provisioner.engine.kernel_id == km.kernel_id
kc.stop_channels()
km.shutdown_kernel(now=True)
first.shutdown_kernel(now=True)
print(json.dumps(result), flush=True)
"""


async def test_a_blocking_client_claims_runs_restarts_and_exit_drains(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    spec = f"sync-{uuid.uuid4().hex[:8]}"
    try:
        done = await run_pooled_script(
            SYNC_CLIENT, tmp_path / "kernels", spec, 1, str(FILL_TIMEOUT)
        )
        assert done.returncode == 0, done.stderr[-4000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["claimed"], result
        assert result["first_run"] == ["ok", "42\n"], result
        assert result["refilled"], result
        assert result["after_restart"] == ["ok", "False\n"], result
        assert result["same_kernel_id"], result
        assert not spec_containers(docker_client, spec)  # drained at interpreter exit
    finally:
        for item in spec_containers(docker_client, spec):
            docker_client.api.remove_container(item["Id"], force=True, v=True)

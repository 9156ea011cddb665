"""Launch parameters on local kernels: other parameters reach the kernel's env through
any client (nbclient too); resource parameters are refused by name; the local fallback
never stands in for a kernel that chose resources."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import EngineUnavailableError, ProvisionerConfigError
from provisioners.parameters import LaunchBounds, LaunchParameterError
from tests.helpers import (
    DOCKER_PROVISIONER,
    KERNEL_TEST_IMAGE,
    LOCAL_PROVISIONER,
    execute,
)

MODE = {"type": "string", "enum": ["fast", "exact"], "default": "fast"}
THREADS = {"type": "integer", "minimum": 1, "maximum": 8, "default": 2}
CPU = {"type": "number", "minimum": 0.5, "maximum": 2, "default": 1}
#: A Docker daemon that is not there: the start falls back to a local kernel.
NO_DAEMON = "unix:///nonexistent/docker.sock"


@pytest.fixture(autouse=True)
def fresh_bounds() -> Iterator[None]:
    LaunchBounds.clear_instance()
    yield
    LaunchBounds.clear_instance()


async def test_nbclient_env_reaches_a_local_kernel_as_parameters(kernel_manager: Any) -> None:
    km = kernel_manager(
        LOCAL_PROVISIONER, {}, metadata={"parameters": {"mode": MODE, "threads": THREADS}}
    )
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import os; print(os.environ['KERNEL_MODE'], os.environ['KERNEL_THREADS'])"
            )
        ]
    )
    client = NotebookClient(nb, km=km, timeout=60)
    async with client.async_setup_kernel(env={"KERNEL_MODE": "exact"}):
        await client.async_execute_cell(nb.cells[0], 0)
        assert km.provisioner.launch_parameters.changed == ("mode",)
    await km.shutdown_kernel()
    assert nb.cells[0].outputs[0]["text"] == "exact 2\n"  # the default of the other one


async def test_a_bad_value_on_a_local_kernel_starts_nothing(kernel_manager: Any) -> None:
    km = kernel_manager(LOCAL_PROVISIONER, {}, metadata={"parameters": {"threads": THREADS}})
    with pytest.raises(LaunchParameterError) as caught:
        await km.start_kernel(env={"KERNEL_THREADS": "8; kill -9 -1"})
    assert caught.value.parameter == "threads"
    assert not km.has_kernel and ClusterPortCache.instance().held() == {}


async def test_a_resource_parameter_on_a_local_kernelspec_is_refused(kernel_manager: Any) -> None:
    km = kernel_manager(LOCAL_PROVISIONER, {}, metadata={"parameters": {"cpu": CPU}})
    with pytest.raises(ProvisionerConfigError, match="'cpu' cannot be applied to local kernels"):
        await km.start_kernel(env={})
    assert not km.has_kernel and ClusterPortCache.instance().held() == {}


async def test_the_fallback_refuses_a_kernel_that_chose_resources(kernel_manager: Any) -> None:
    config = {"image": KERNEL_TEST_IMAGE, "docker_host": NO_DAEMON, "sweep_on_start": False}
    metadata = {"parameters": {"cpu": CPU, "mode": MODE}}
    chose = kernel_manager(DOCKER_PROVISIONER, config, metadata=metadata, name="fb")
    began = time.monotonic()
    with pytest.raises(EngineUnavailableError) as caught:
        await chose.start_kernel(env={"KERNEL_CPU": "2"})
    assert time.monotonic() - began < 30
    assert "cannot give the kernel its launch parameters (cpu=2)" in str(caught.value)
    assert not chose.has_kernel and ClusterPortCache.instance().held() == {}
    # the defaults (and other parameters): the fallback runs the kernel as before
    default = kernel_manager(DOCKER_PROVISIONER, config, metadata=metadata, name="fb")
    await default.start_kernel(env={"KERNEL_MODE": "exact"})
    assert default.provisioner.engine.fallback_for == "docker"
    out = await execute(default, "import os; print(os.environ['KERNEL_MODE'])")
    assert out["stdout"].endswith("exact\n")
    await default.shutdown_kernel()
    assert ClusterPortCache.instance().held() == {}

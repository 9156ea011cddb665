"""Config errors, the local fallback rule and cleanup after partial starts, on the base."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners import ClusterProvisioner
from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import (
    EngineUnavailableError,
    KernelStartError,
    ProvisionerConfigError,
    ProvisionerError,
)
from provisioners.lifecycle.engine import Engine
from tests.helpers import execute, write_kernelspec

BAD_CONFIGS = [
    ({"no_such_key": 1}, "no_such_key"),
    ({"launch_timeout": "soon"}, "launch_timeout"),
    ({"port_range": "9-1"}, "port_range"),
    ({"port_range": 40000}, "port_range"),
    ({"fallback": "maybe"}, "fallback"),
    ({"env": ["A=1"]}, "env"),
    ({"inherit_server_env": 3}, "inherit_server_env"),
    ({"command": "python -m ipykernel"}, "command"),
]


@pytest.mark.parametrize(("config", "key"), BAD_CONFIGS)
async def test_bad_config_is_named_and_starts_nothing(
    kernel_manager, config: dict[str, Any], key: str
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    km = kernel_manager("cluster-local-provisioner", config, name="badspec")
    with pytest.raises(ProvisionerConfigError) as info:
        await km.start_kernel()
    assert info.value.key in (key, "")
    assert key in str(info.value) and "badspec" in str(info.value)
    assert not km.has_kernel
    assert ClusterPortCache.instance().held() == {}
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


class _StubEngine(Engine):
    """An engine whose hooks are scripted by the test (through its provisioner)."""

    target: ClassVar[str] = "stub"

    def __init__(self, settings: Any, kernel_id: str) -> None:
        super().__init__(settings, kernel_id)
        self.proc: subprocess.Popen[bytes] | None = None
        self.removed = False

    async def check_engine(self) -> None:
        if self.settings.unreachable:
            raise EngineUnavailableError("no engine socket at /nonexistent/stub.sock")

    async def start_kernel(self, cmd: list[str], env: dict[str, str], kernel_info, **kw) -> None:
        stage = self.settings.fail_stage
        if stage == "before-create":
            raise KernelStartError("image 'nope:latest' not found", target="stub")
        self.proc = subprocess.Popen(["sleep", "60"])
        self.started = True
        if stage == "after-create":
            raise KernelStartError("container exited: boom", target="stub")
        if stage == "hang":
            await asyncio.sleep(3600)

    async def poll_kernel(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def stop_kernel(self, force: bool) -> None:
        if self.proc is not None:
            self.proc.kill()

    async def remove_kernel(self, restart: bool) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.started = False
        self.removed = True


class _Stub(ClusterProvisioner):
    """A target whose engine is scripted by the test."""

    target: ClassVar[str] = "stub"
    engine_class: ClassVar[type[Engine]] = _StubEngine
    unreachable = False
    fail_stage = ""


def _manager(tmp_path: Path, stub: _Stub | None = None, **config: Any) -> AsyncKernelManager:
    ksm = write_kernelspec(tmp_path / "kernels", "stubspec", "cluster-local-provisioner")
    km = AsyncKernelManager(kernel_name="stubspec", kernel_spec_manager=ksm)
    km.kernel_id = str(uuid.uuid4())
    km.provisioner = _Stub(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km, **config)
    return km


async def test_unreachable_engine_falls_back_to_local(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    km = _manager(tmp_path)
    km.provisioner.unreachable = True
    with caplog.at_level(logging.WARNING):
        await km.start_kernel()
    try:
        assert km.provisioner.engine.fallback_for
        assert "stub engine is unreachable" in caplog.text
        assert "/nonexistent/stub.sock" in caplog.text
        assert (await execute(km, "print('fell back')"))["stdout"] == "fell back\n"
    finally:
        await km.shutdown_kernel()
    assert ClusterPortCache.instance().held() == {}


async def test_no_fallback_raises_and_leaves_nothing(tmp_path: Path) -> None:
    km = _manager(tmp_path, fallback="none")
    km.provisioner.unreachable = True
    with pytest.raises(EngineUnavailableError, match=r"stub\.sock"):
        await km.start_kernel()
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.parametrize("stage", ["before-create", "after-create", "hang"])
async def test_failed_start_never_falls_back_and_cleans_up(tmp_path: Path, stage: str) -> None:
    km = _manager(tmp_path, launch_timeout=1.0)
    stub = km.provisioner
    stub.fail_stage = stage
    with pytest.raises(ProvisionerError) as info:
        await km.start_kernel()
    if stage == "hang":
        assert "launch_timeout=1" in str(info.value)
    assert not stub.engine.fallback_for  # a start failure is not an unreachable engine
    engine = stub.engine
    assert isinstance(engine, _StubEngine) and engine.removed and engine.proc is None
    assert ClusterPortCache.instance().held() == {}

"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from tests.helpers import write_kernelspec

#: Engine fixtures (docker_client, ssh_engine, target) shared by every suite.
pytest_plugins = ["tests.engine_fixtures"]


@pytest.fixture(autouse=True)
def jupyter_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Jupyter runtime dir per test, so stores and files are checked in isolation."""
    runtime = tmp_path_factory.mktemp("runtime")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    from provisioners.connection.ports import ClusterPortCache

    monkeypatch.setattr(ClusterPortCache, "_instance", None)
    return runtime


@pytest.fixture
async def kernel_manager(tmp_path: Path) -> AsyncIterator[Callable[..., AsyncKernelManager]]:
    """Factory of AsyncKernelManagers for a kernelspec written on the fly; all are shut
    down (now=True) at teardown if a test left them running."""
    made: list[AsyncKernelManager] = []

    def make(
        provisioner: str, config: dict[str, Any] | None = None, **spec: Any
    ) -> AsyncKernelManager:
        name = spec.pop("name", f"k{len(made)}")
        ksm = write_kernelspec(tmp_path / "kernels", name, provisioner, config, **spec)
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        made.append(km)
        return km

    yield make
    for km in made:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run ``disruptive`` tests (they restart an engine) after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the security and fault suites' counts per target."""
    from tests.helpers import SUITE_COUNTS

    if not SUITE_COUNTS:
        return
    terminalreporter.section("security and fault suite counts")
    for what in sorted({w for w, _ in SUITE_COUNTS}):
        per_target = ", ".join(
            f"{t}={n}" for (w, t), n in sorted(SUITE_COUNTS.items()) if w == what
        )
        terminalreporter.write_line(f"{what}: {per_target}")

"""``jupyter-provisioners list``: one row per kernel with its kernelspec, target, where it
runs, whether it is on the local fallback, its age and whether its server is alive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from tests.helpers import CONTAINER_ARGV, cli_env, write_kernelspec
from tests.targets import TargetCase

#: What the WHERE column names for each target.
WHERE = {"local": " pid ", "docker": "container ", "ssh": " pid ", "kubernetes": "pod "}


def list_kernels(kernels: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provisioners", "list", "--kernel-dir", str(kernels), *extra],
        capture_output=True, text=True, timeout=120, env=cli_env(), check=False,
    )  # fmt: skip


def install(kernels: Path, name: str, provisioner: str, config: dict, argv: list[str]) -> Any:
    """A kernelspec whose display name differs from its name, as most do."""
    write_kernelspec(kernels, name, provisioner, config, argv=argv)
    path = kernels / name / "kernel.json"
    spec = json.loads(path.read_text())
    path.write_text(json.dumps({**spec, "display_name": f"Python ({name}, shown)"}))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def row_of(
    result: subprocess.CompletedProcess[str], kernel_id: str, status: int = 0
) -> dict[str, Any]:
    assert result.returncode == status, result.stderr
    rows = [row for row in json.loads(result.stdout) if row["kernel_id"] == kernel_id]
    assert len(rows) == 1, result.stdout
    return rows[0]


async def test_list_shows_each_kernel(target: TargetCase, tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    ksm = install(kernels, "listed", target.provisioner, target.config, target.argv)
    km = AsyncKernelManager(kernel_name="listed", kernel_spec_manager=ksm)
    await km.start_kernel()
    try:
        row = row_of(list_kernels(kernels, "--json"), km.kernel_id)
        assert row["kernelspec"] == "listed"
        assert row["target"] == target.name
        assert WHERE[target.name] in row["where"], row
        assert row["fallback"] is False and row["fallback_for"] == ""
        assert 0 <= row["age"] < 600
        assert row["owner_alive"] is True
        table = list_kernels(kernels)
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        columns = [
            "KERNEL",
            "ID",
            "KERNELSPEC",
            "TARGET",
            "STATE",
            "WHERE",
            "FALLBACK",
            "AGE",
            "SERVER",
        ]
        assert header.split() == columns
        line = next(line for line in lines if line.startswith(km.kernel_id))
        assert " listed " in line and f" {target.name} " in line and line.endswith("alive")
        assert row["state"] and f" {row['state']} " in line  # the table shows the state
    finally:
        await km.shutdown_kernel()
    gone = list_kernels(kernels, "--json")
    assert km.kernel_id not in [row["kernel_id"] for row in json.loads(gone.stdout)]


async def test_list_marks_a_kernel_on_the_local_fallback(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    config = {"docker_host": f"unix://{tmp_path}/no-daemon.sock", "image": "any/image:1"}
    ksm = install(kernels, "fell-back", "cluster-docker-provisioner", config, CONTAINER_ARGV)
    spec = json.loads((kernels / "fell-back" / "kernel.json").read_text())
    spec["argv"] = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "fell-back" / "kernel.json").write_text(json.dumps(spec))
    km = AsyncKernelManager(kernel_name="fell-back", kernel_spec_manager=ksm)
    await km.start_kernel()
    try:
        result = list_kernels(kernels, "--json")
        # the kernelspec's own engine is unreachable: list says so and exits 1
        row = row_of(result, km.kernel_id, status=1)
        assert row["fallback"] is True and row["target"] == "local", row
        assert row["fallback_for"] == "docker"
        assert row["kernelspec"] == "fell-back" and " pid " in row["where"]
        assert "'fell-back'" in result.stderr and "unreachable" in result.stderr
        line = next(ln for ln in list_kernels(kernels).stdout.splitlines() if km.kernel_id in ln)
        assert " for docker " in line
    finally:
        await km.shutdown_kernel()


async def test_list_says_a_persisted_kernel_is_detached(docker_client: Any, tmp_path: Path) -> None:
    """A kernel its stopping server detached waits for adoption: ``list`` says since when."""
    from tests.helpers import KERNEL_TEST_IMAGE

    kernels = tmp_path / "kernels"
    config = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, "persist_kernels": True}
    ksm = install(kernels, "kept", "cluster-docker-provisioner", config, CONTAINER_ARGV)
    km = AsyncKernelManager(kernel_name="kept", kernel_spec_manager=ksm)
    await km.start_kernel()
    try:
        assert await km.provisioner.detach()
        row = row_of(list_kernels(kernels, "--json"), km.kernel_id)
        assert row["state"] == "running"
        assert row["detached_for"] is not None and 0 <= row["detached_for"] < 600
        table = list_kernels(kernels)
        line = next(line for line in table.stdout.splitlines() if km.kernel_id in line)
        assert line.rstrip().endswith("ago") and "detached" in line, table.stdout
    finally:
        for item in docker_client.api.containers(
            all=True, filters={"label": f"cluster-provisioners.kernel-id={km.kernel_id}"}
        ):
            docker_client.api.remove_container(item["Id"], force=True)
        await km.shutdown_kernel(now=True)

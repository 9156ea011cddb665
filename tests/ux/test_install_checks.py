"""``kernelspec install`` checks what it can without starting anything, and only warns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import KERNEL_TEST_IMAGE, cli_env


def install(tmp_path: Path, target: str, *settings: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "provisioners", "kernelspec", "install", "checked"]
    args += ["--target", target, "--prefix", str(tmp_path)]
    for setting in settings:
        args += ["--set", setting]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, env=cli_env(), check=False
    )


def installed(tmp_path: Path) -> dict:
    path = tmp_path / "share" / "jupyter" / "kernels" / "checked" / "kernel.json"
    return json.loads(path.read_text())


@pytest.mark.docker
def test_docker_missing_image_warns_with_the_fix(docker_client, tmp_path: Path) -> None:
    result = install(
        tmp_path, "docker", "image=cluster-provisioners/no-such:1", "pull_policy=never"
    )
    assert result.returncode == 0, result.stderr
    assert "warning: kernelspec checked" in result.stderr
    assert "'cluster-provisioners/no-such:1' is not present" in result.stderr
    assert "docker pull cluster-provisioners/no-such:1" in result.stderr
    assert installed(tmp_path)["metadata"]["kernel_provisioner"]["config"]["image"]


@pytest.mark.docker
def test_docker_present_image_installs_quietly(docker_client, tmp_path: Path) -> None:
    result = install(tmp_path, "docker", f"image={KERNEL_TEST_IMAGE}")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert "Installed kernelspec checked" in result.stdout


def test_docker_unreachable_daemon_only_warns(tmp_path: Path) -> None:
    socket = tmp_path / "no-daemon.sock"
    result = install(tmp_path, "docker", f"docker_host=unix://{socket}", "image=any/image:1")
    assert result.returncode == 0, result.stderr
    assert "warning: kernelspec checked" in result.stderr and "unreachable" in result.stderr
    assert "start as local processes" in result.stderr  # fallback='local' is the default
    assert installed(tmp_path)["metadata"]["kernel_provisioner"]["config"]["docker_host"]
    strict = install(
        tmp_path / "strict",
        "docker",
        f"docker_host=unix://{socket}",
        "image=any/image:1",
        "fallback=none",
    )
    assert strict.returncode == 0, strict.stderr
    assert "fail to start (fallback='none')" in strict.stderr


@pytest.mark.k8s
def test_kubernetes_namespace_checks(kube, tmp_path: Path) -> None:
    settings = [f"{k}={json.dumps(v)}" for k, v in kube.config().items()]
    fine = install(tmp_path / "fine", "kubernetes", *settings)
    assert fine.returncode == 0, fine.stderr
    assert "warning" not in fine.stderr
    if kube.forbid is None:
        pytest.skip("a real cluster's RBAC cannot be changed by the test")
    denial = kube.forbid("list", "pods")
    try:
        denied = install(tmp_path / "denied", "kubernetes", *settings)
    finally:
        denial.lift()
    assert denied.returncode == 0, denied.stderr
    assert "cannot be listed (Forbidden)" in denied.stderr
    assert "Role" in denied.stderr and kube.namespace in denied.stderr

"""A Docker pull shows its progress: layers and bytes as the daemon reports them.

No outside registry can be reached, so the test runs Debian's registry (``docker-registry``)
on 127.0.0.1, pushes an image made of the test image plus a fresh layer, removes it from
the daemon, and starts a kernel with ``pull_policy = "always"``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from provisioners.docker.pull import PullProgress
from tests.helpers import (
    CONTAINER_ARGV,
    KERNEL_TEST_IMAGE,
    cli_env,
    skip_or_fail,
    write_kernelspec,
)

REGISTRY = Path("/usr/bin/docker-registry")


def test_pull_progress_sums_layers_and_bytes() -> None:
    clock = iter(range(100))
    tracker = PullProgress("img", clock=lambda: float(next(clock)))
    assert tracker.update({"status": "Pulling fs layer", "id": "a"}) == "0/1 layers done"
    tracker.update({"status": "Pulling fs layer", "id": "b"})
    line = tracker.update(
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 1e6, "total": 4e6}}
    )
    assert line == "0/2 layers done, 1.0 of 4.0 MB"
    assert tracker.update({"status": "Pull complete", "id": "a"}).startswith("1/2 layers done")
    with pytest.raises(docker.errors.APIError, match="manifest unknown"):
        tracker.update({"error": "manifest unknown"})


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry on 127.0.0.1 (the daemon trusts loopback registries over plain HTTP)."""
    if not REGISTRY.exists():
        skip_or_fail("docker", "docker-registry is not installed; run .ci/setup-engines")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("registry")
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "log:\n  level: error\n"
    )
    proc = subprocess.Popen([str(REGISTRY), "serve", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.docker
def test_run_shows_pull_progress(docker_client, registry: str, tmp_path: Path) -> None:
    image = f"{registry}/kernel-pull:{uuid.uuid4().hex[:8]}"
    context = tmp_path / "image"
    context.mkdir()
    (context / "blob").write_bytes(os.urandom(3_000_000))
    (context / "Dockerfile").write_text(f"FROM {KERNEL_TEST_IMAGE}\nCOPY blob /opt/blob\n")
    docker_client.images.build(path=str(context), tag=image, rm=True)
    try:
        for line in docker_client.api.push(image, stream=True, decode=True):
            assert "error" not in line, line
        docker_client.images.remove(image)
        kernels = tmp_path / "kernels"
        config = {"image": image, "pull_policy": "always"}
        provisioner = "cluster-docker-provisioner"
        write_kernelspec(kernels, "pulled", provisioner, config, argv=CONTAINER_ARGV)
        command = [sys.executable, "-m", "provisioners", "run", "--kernel-dir", str(kernels)]
        command += ["--kernel", "pulled", "-c", "print(6 * 7)"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=240, env=cli_env(), check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"
        pulls = [line for line in result.stderr.splitlines() if "pulling image:" in line]
        assert any(image in line for line in pulls), result.stderr
        assert any("layers done" in line for line in pulls), result.stderr
        assert any(line.endswith("MB") or "Status:" in line for line in pulls), result.stderr
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(image, force=True)

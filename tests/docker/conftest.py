"""Fixtures of the Docker suite: a real daemon, the offline kernel image, cleanup checks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import docker
import pytest
from jupyter_client.manager import AsyncKernelManager

from provisioners.docker import LABEL_KERNEL_ID
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE

DOCKER = "cluster-docker-provisioner"


class KernelTracker:
    """Kernel ids a test started; their containers must be gone at teardown."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.kernel_ids: set[str] = set()

    def containers(self, kernel_id: str | None = None) -> list[dict[str, Any]]:
        """Containers (any state) labelled with ``kernel_id`` or any tracked kernel id."""
        ids = {kernel_id} if kernel_id else self.kernel_ids
        found = []
        for kid in sorted(ids):
            flt = {"label": f"{LABEL_KERNEL_ID}={kid}"}
            found += self.client.api.containers(all=True, filters=flt)
        return found


@pytest.fixture
async def docker_kernels(
    docker_client: docker.DockerClient,
    kernel_manager: Callable[..., AsyncKernelManager],
) -> AsyncIterator[tuple[Callable[..., AsyncKernelManager], KernelTracker]]:
    """Factory of kernel managers for the docker provisioner on the test image, and a
    tracker; at teardown every kernel is shut down and no container of theirs may remain."""
    tracker = KernelTracker(docker_client)
    made: list[AsyncKernelManager] = []

    def make(config: dict[str, Any] | None = None, **spec: Any) -> AsyncKernelManager:
        settings = {"image": KERNEL_TEST_IMAGE, "sweep_on_start": False, **(config or {})}
        spec.setdefault("argv", CONTAINER_ARGV)
        km = kernel_manager(DOCKER, settings, **spec)
        km.kernel_id = str(uuid.uuid4())
        tracker.kernel_ids.add(km.kernel_id)
        made.append(km)
        return km

    yield make, tracker
    for km in made:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    left = tracker.containers()
    for item in left:
        docker_client.api.remove_container(item["Id"], force=True, v=True)
    assert not left, f"containers left behind: {[c['Names'] for c in left]}"

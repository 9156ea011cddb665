"""Start failures are fast, named and leave nothing behind; bad config names its key."""

from __future__ import annotations

import logging
import time

import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.docker import LABEL_OWNER
from provisioners.exceptions import (
    EngineUnavailableError,
    KernelStartError,
    ProvisionerConfigError,
    ProvisionerError,
)
from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, LOCAL_ARGV, execute

DOCKER = "cluster-docker-provisioner"
NO_DAEMON = "unix:///nonexistent/cluster-provisioners/docker.sock"


@pytest.mark.docker
@pytest.mark.parametrize("pull_policy", ["never", "if-missing"])
async def test_missing_image_fails_fast(docker_kernels, pull_policy: str) -> None:
    make, tracker = docker_kernels
    image = "cluster-provisioners/no-such-image:never-built"
    km = make({"image": image, "pull_policy": pull_policy})
    started = time.monotonic()
    with pytest.raises(KernelStartError, match="no-such-image:never-built"):
        await km.start_kernel()
    assert time.monotonic() - started < 2.0
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.docker
async def test_container_exiting_at_start_reports_its_log(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make({"command": ["python3", "-c", "import sys; print('boom'); sys.exit(3)"]})
    with pytest.raises(KernelStartError, match="boom") as failure:
        await km.start_kernel()
    # a short first line (what a notebook's dialog shows first), then the log's end
    first, where, heading, *tail = str(failure.value).splitlines()
    assert first == "The kernel exited with code 3 while starting."
    assert "cluster-provisioners/kernel-test" in where and heading.startswith("--- last lines")
    assert tail == ["boom"]
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.docker
async def test_a_silent_kernel_exit_says_its_log_is_empty(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make({"command": ["python3", "-c", "import sys; sys.exit(3)"]})
    with pytest.raises(KernelStartError, match="exited with code 3") as failure:
        await km.start_kernel()
    assert str(failure.value).endswith("(the kernel wrote nothing to its log)")
    assert tracker.containers(km.kernel_id) == []


async def test_unreachable_daemon_falls_back_to_local(kernel_manager, caplog) -> None:
    caplog.set_level(logging.WARNING)
    km = kernel_manager(
        DOCKER, {"image": KERNEL_TEST_IMAGE, "docker_host": NO_DAEMON}, argv=LOCAL_ARGV
    )
    await km.start_kernel()
    try:
        assert km.provisioner.engine.fallback_for
        assert "docker engine is unreachable" in caplog.text
        assert NO_DAEMON in caplog.text
        assert (await execute(km, "print('local')"))["stdout"] == "local\n"
    finally:
        await km.shutdown_kernel(now=True)
    assert ClusterPortCache.instance().held() == {}


async def test_unreachable_daemon_without_fallback_raises(kernel_manager) -> None:
    config = {"image": KERNEL_TEST_IMAGE, "docker_host": NO_DAEMON, "fallback": "none"}
    km = kernel_manager(DOCKER, config, argv=CONTAINER_ARGV)
    started = time.monotonic()
    with pytest.raises(EngineUnavailableError, match="nonexistent"):
        await km.start_kernel()
    assert time.monotonic() - started < 5.0
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "image"),
        ({"memory_limit": "lots"}, "memory_limit"),
        ({"cpu_limit": "two"}, "cpu_limit"),
        ({"cpu_limit": -1}, "cpu_limit"),
        ({"gpus": "some"}, "gpus"),
        ({"pull_policy": "sometimes"}, "pull_policy"),
        ({"pids_limit": -1}, "pids_limit"),
        ({"cap_drop": ["ALL; rm -rf /"]}, "cap_drop"),
        ({"publish_ip": "localhost"}, "publish_ip"),
        ({"volumes": ["data"]}, "volumes"),
        ({"mounts": [{"Type": "tmpfs"}]}, "mounts"),
        ({"labels": {LABEL_OWNER: "me"}}, "labels"),
        ({"extra_create_args": {"name": "mine"}}, "extra_create_args"),
        ({"extra_create_args": {"no_such_argument": 1}}, "extra_create_args"),
        ({"docker_host": "/var/run/docker.sock"}, "docker_host"),
        ({"docker_host": "tcp://build-host:2375"}, "publish_ip"),
        ({"name_prefix": "-kernel"}, "name_prefix"),
        ({"imagee": "typo"}, "imagee"),
    ],
)
async def test_bad_config_names_the_key(kernel_manager, config: dict, key: str) -> None:
    settings = {"image": KERNEL_TEST_IMAGE, **config} if key != "image" else config
    km = kernel_manager(DOCKER, settings, argv=CONTAINER_ARGV)
    with pytest.raises(ProvisionerConfigError, match=repr(key)) as failure:
        await km.start_kernel()
    assert failure.value.key == key


@pytest.mark.docker
async def test_launch_timeout_removes_the_container(docker_kernels) -> None:
    make, tracker = docker_kernels
    km = make({"command": ["sleep", "60"], "launch_timeout": 1.5})
    with pytest.raises(ProvisionerError, match="launch_timeout"):
        await km.start_kernel()
    assert tracker.containers(km.kernel_id) == []
    assert ClusterPortCache.instance().held() == {}

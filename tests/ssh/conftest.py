"""Fixtures of the SSH suite: a real sshd on 127.0.0.1, kernels behind it, leak checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection import sshconnect
from provisioners.connection.ports import ClusterPortCache
from provisioners.connection.sshlink import ENV_KNOWN_HOSTS, SSHLink
from tests.helpers import start_sshd, wait_for
from tests.helpers.ssh import tunnel_threads


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One sshd per test module (the tests never change its configuration)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def known_hosts(sshd: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The sshd's known_hosts, also set as the default of provisioners.connection.sshlink."""
    monkeypatch.setenv(ENV_KNOWN_HOSTS, str(sshd.known_hosts_path))
    return Path(sshd.known_hosts_path)


@pytest.fixture
def server(sshd: Any, known_hosts: Path) -> str:
    """``user@127.0.0.1:port`` of the sshd."""
    return f"{sshd.user}@{sshd.host}:{sshd.port}"


@pytest.fixture
def remote_runtime(tmp_path: Path) -> Path:
    """The 'remote' host's runtime directory (the same machine, reached over ssh)."""
    path = tmp_path / "remote-runtime"
    path.mkdir()
    return path


@pytest.fixture
def ssh_config(sshd: Any, remote_runtime: Path) -> dict[str, Any]:
    """Kernelspec config of the SSH provisioner for the sshd."""
    return sshd.kernel_config(remote_runtime, ssh_connect_timeout=5.0)


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test (and its fixtures): no SSH link, no tunnel thread, no port record.

    Also: no SSH agent (tests use only the credentials they configure), and host keys
    accepted by one test are forgotten before the next.
    """
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield
    with sshconnect._ACCEPTED_LOCK:
        sshconnect._ACCEPTED_KEYS.clear()
    assert wait_for(lambda: not tunnel_threads()), tunnel_threads()
    assert SSHLink.active() == []
    assert ClusterPortCache.instance().held() in ({}, {"localhost": {}})

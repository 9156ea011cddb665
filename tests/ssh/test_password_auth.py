"""Password authentication against a real sshd, with a throwaway system user."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioners.exceptions import SSHAuthenticationError
from tests.helpers import execute, skip_or_fail
from tests.ssh.conftest import start_sshd

pytestmark = pytest.mark.ssh
USER = "cp-ssh-pw-test"


@pytest.fixture
def password_user() -> Iterator[tuple[str, str]]:
    """A system user with a random password, removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("chpasswd"):
        skip_or_fail("ssh", "creating a password user needs root, useradd and chpasswd")
    password = secrets.token_urlsafe(18)
    subprocess.run(["userdel", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{USER}:{password}", text=True, check=True)
        yield USER, password
    finally:
        subprocess.run(["userdel", USER], capture_output=True, check=False)


async def test_tunnels_authenticate_with_a_password(
    kernel_manager: Any, password_user: tuple[str, str], tmp_path: Path
) -> None:
    user, password = password_user
    sshd = start_sshd(tmp_path / "sshd", user=user, password_auth=True)
    try:
        config = {
            "ssh_server": f"{user}@127.0.0.1:{sshd.port}",
            "ssh_password": password,
            "ssh_known_hosts": str(sshd.known_hosts_path),
            "fallback": "none",
        }
        km = kernel_manager("cluster-local-provisioner", config)
        await km.start_kernel()
        try:
            out = await execute(km, "print('through a password tunnel')")
            assert out["stdout"] == "through a password tunnel\n"
        finally:
            await km.shutdown_kernel()

        wrong = kernel_manager("cluster-local-provisioner", {**config, "ssh_password": "nope"})
        with pytest.raises(SSHAuthenticationError):
            await wrong.start_kernel()
    finally:
        sshd.stop()

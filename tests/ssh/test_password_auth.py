"""Password authentication against a real sshd, with a throwaway system user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import ProvisionerConfigError, SSHAuthenticationError
from tests.helpers import count, execute, start_sshd

pytestmark = pytest.mark.ssh


def _secret_file(path: Path, secret: str, mode: int) -> Path:
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


async def test_tunnels_authenticate_with_a_referenced_password(
    kernel_manager: Any,
    password_user: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The password comes from a 0600 file or an environment variable, never kernel.json."""
    user, password = password_user
    sshd = start_sshd(tmp_path / "sshd", user=user, password_auth=True)
    monkeypatch.setenv("CP_TEST_SSH_PASSWORD", password)
    secret_file = _secret_file(tmp_path / "ssh-password", password, 0o600)
    try:
        config = {
            "ssh_server": f"{user}@127.0.0.1:{sshd.port}",
            "ssh_known_hosts": str(sshd.known_hosts_path),
            "fallback": "none",
        }
        for reference in (f"file:{secret_file}", "env:CP_TEST_SSH_PASSWORD"):
            km = kernel_manager("cluster-local-provisioner", {**config, "ssh_password": reference})
            await km.start_kernel()
            try:
                out = await execute(km, "print('through a password tunnel')")
                assert out["stdout"] == "through a password tunnel\n"
            finally:
                await km.shutdown_kernel()
            spec = json.loads((Path(km.kernel_spec.resource_dir) / "kernel.json").read_text())
            assert password not in json.dumps(spec)
            count("secret references used", "ssh")

        wrong_file = _secret_file(tmp_path / "wrong", "nope", 0o600)
        wrong = kernel_manager(
            "cluster-local-provisioner", {**config, "ssh_password": f"file:{wrong_file}"}
        )
        with pytest.raises(SSHAuthenticationError):
            await wrong.start_kernel()
    finally:
        sshd.stop()


@pytest.mark.parametrize("provisioner", ["cluster-local-provisioner", "cluster-ssh-provisioner"])
async def test_a_literal_secret_is_refused_at_start(
    kernel_manager: Any, password_user: tuple[str, str], tmp_path: Path, provisioner: str
) -> None:
    """An existing kernel.json holding a password is refused, naming what to use instead;
    so is a secret file others can read. Nothing connects, nothing is left."""
    user, password = password_user
    sshd = start_sshd(tmp_path / "sshd", user=user, password_auth=True)
    try:
        if provisioner == "cluster-ssh-provisioner":
            key = "password"
            config = {"host": "127.0.0.1", "port": sshd.port, "user": user}
        else:
            key = "ssh_password"
            config = {"ssh_server": f"{user}@127.0.0.1:{sshd.port}"}
        config.update(ssh_known_hosts=str(sshd.known_hosts_path), fallback="none")
        km = kernel_manager(provisioner, {**config, key: password}, name="literal")
        with pytest.raises(ProvisionerConfigError) as info:
            await km.start_kernel()
        assert info.value.key == key
        message = str(info.value)
        assert "'literal'" in message and "file:" in message and "env:" in message
        assert password not in message
        assert not km.has_kernel and ClusterPortCache.instance().held() == {}
        count("literal secrets refused", "ssh")

        loose = _secret_file(tmp_path / "readable", password, 0o644)
        km = kernel_manager(provisioner, {**config, key: f"file:{loose}"}, name="loose")
        with pytest.raises(ProvisionerConfigError, match="0600"):
            await km.start_kernel()
        assert not km.has_kernel and ClusterPortCache.instance().held() == {}
        count("literal secrets refused", "ssh")
    finally:
        sshd.stop()


async def test_ssh_target_logs_in_with_a_referenced_password(
    password_user: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SSH target's own 'password' is a reference too, and really logs in (the
    throwaway user cannot run this Python's ipykernel, so a remote listing proves it)."""
    from provisioners.ssh import SSHClusterProvisioner

    user, password = password_user
    sshd = start_sshd(tmp_path / "sshd", user=user, password_auth=True)
    monkeypatch.setenv("CP_TEST_SSH_PASSWORD", password)
    try:
        config = {
            "host": "127.0.0.1",
            "port": sshd.port,
            "user": user,
            "ssh_known_hosts": str(sshd.known_hosts_path),
            "remote_runtime_dir": "/tmp",
        }
        good = SSHClusterProvisioner(kernel_id="k", password="env:CP_TEST_SSH_PASSWORD", **config)
        assert await good.list_kernels() == []
        count("secret references used", "ssh")
        wrong = SSHClusterProvisioner(kernel_id="k", password="env:CP_TEST_NOT_SET", **config)
        with pytest.raises(ProvisionerConfigError, match="CP_TEST_NOT_SET"):
            await wrong.list_kernels()
    finally:
        sshd.stop()

"""A Kubernetes kernel's secrets come from a Secret reference, never from kernel.json.

The kernel's channels go through a password-authenticated SSH tunnel (a real sshd), the
password read from a Secret in the kernel's namespace (``ssh_password = secret:NAME/KEY``).
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from provisioners.exceptions import ProvisionerConfigError
from provisioners.k8s.client import KubeClient
from tests.helpers import KUBERNETES_PROVISIONER, Kube, count, execute, start_sshd

pytestmark = [pytest.mark.k8s, pytest.mark.ssh, pytest.mark.timeout(180)]


async def test_ssh_password_from_a_kubernetes_secret(
    kernel_manager: Any,
    kube: Kube,
    kube_api: KubeClient,
    password_user: tuple[str, str],
    tmp_path: Path,
) -> None:
    user, password = password_user
    name = f"cp-ssh-password-{secrets.token_hex(4)}"
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {"password": base64.b64encode(password.encode()).decode()},
    }
    await kube_api.request("POST", f"/api/v1/namespaces/{kube.namespace}/secrets", body=body)
    sshd = start_sshd(tmp_path / "sshd", user=user, password_auth=True)
    try:
        config = kube.config(
            ssh_server=f"{user}@127.0.0.1:{sshd.port}",
            ssh_known_hosts=str(sshd.known_hosts_path),
            ssh_password=f"secret:{name}/password",
        )
        km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
        await km.start_kernel()
        try:
            out = await execute(km, "print('through a tunnel, password from a Secret')")
            assert out["stdout"] == "through a tunnel, password from a Secret\n"
        finally:
            await km.shutdown_kernel()
        spec = json.loads((Path(km.kernel_spec.resource_dir) / "kernel.json").read_text())
        assert password not in json.dumps(spec)
        count("secret references used", "kubernetes")

        missing = kernel_manager(
            KUBERNETES_PROVISIONER,
            {**config, "ssh_password": f"secret:{name}/nokey"},
            **kube.spec(),
        )
        with pytest.raises(ProvisionerConfigError, match="nokey") as info:
            await missing.start_kernel()
        assert info.value.key == "ssh_password"
        assert not missing.has_kernel
    finally:
        sshd.stop()
        await kube_api.request("DELETE", f"/api/v1/namespaces/{kube.namespace}/secrets/{name}")

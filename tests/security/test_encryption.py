"""Transport encryption (CurveZMQ) on every target: checked on the wire, never degraded.

Each test runs once per target (``target``, tests/engine_fixtures.py). A
:class:`WireRecorder` relays the kernel's channels and keeps every byte: with encryption
neither the code sent nor the output received may show in them; without it both do, so
the check can fail.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

import docker
import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import TransportEncryptionError
from tests.helpers import CONTAINER_ARGV, cli, count, skip_or_fail, wait_for_no_leftovers
from tests.security.wire import CURVE, execute_recorded
from tests.targets import TargetCase, resolve

#: A kernel that cannot encrypt: it drops the Curve keys from its connection file, as
#: ipykernel < 7.4 ignores them, then runs ipykernel in plain text.
PLAINTEXT_KERNEL = (
    "import json, os, sys\n"
    "path = sys.argv[1]\n"
    "info = json.load(open(path))\n"
    "info.pop('curve_publickey', None); info.pop('curve_secretkey', None)\n"
    "json.dump(info, open(path, 'w'))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ipykernel_launcher', '-f', path])\n"
)
BASE_IMAGE = os.environ.get(
    "CLUSTER_PROVISIONERS_TEST_BASE_IMAGE", "cluster-provisioners/kernel-test-base:bookworm"
)


@pytest.mark.parametrize("policy", ["manager-auto", "kernelspec-required", "disabled"])
async def test_encryption_on_the_wire(
    kernel_manager, target: TargetCase, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = {"transport_encryption": "required"} if policy == "kernelspec-required" else {}
    km = kernel_manager(target.provisioner, **target.spec(**config), metadata=CURVE)
    if policy == "manager-auto":
        km.transport_encryption = "auto"  # jupyter_client's own setting
    await km.start_kernel()
    encrypted = policy != "disabled"
    token = uuid.uuid4().hex
    code_marker = f"code-canary-{token[:12]}"
    output = f"output-canary-{token[12:]}"
    # the output is built at run time: it is not in the code
    code = f"print({output[::-1]!r}[::-1])  # {code_marker}"
    try:
        out, wire = await execute_recorded(km, code)
        assert out["stdout"] == output + "\n", out
        assert wire, "the recorder saw no traffic"
        if not encrypted:
            assert km.curve_publickey is None
            assert code_marker.encode() in wire and output.encode() in wire
            return
        assert km.curve_publickey is not None and km.curve_secretkey is not None
        assert code_marker.encode() not in wire, f"{target.name}: the code crossed in clear"
        assert output.encode() not in wire, f"{target.name}: the output crossed in clear"
        assert b"execute_request" not in wire and b"msg_type" not in wire
        secret, public = km.curve_secretkey.decode(), km.curve_publickey
        assert secret not in await resolve(target.inspect(km)), f"key shows in {target.name}"
        await km.restart_kernel()  # the manager's keypair is reused
        assert km.curve_publickey == public
        out, wire = await execute_recorded(km, code)
        assert out["stdout"] == output + "\n"
        assert output.encode() not in wire and code_marker.encode() not in wire
        assert secret not in await resolve(target.inspect(km))
        count("encrypted kernels checked on the wire", target.name)
    finally:
        await km.shutdown_kernel()
    assert secret not in caplog.text, "the Curve secret key was logged"


def _plaintext_argv(target: TargetCase) -> list[str]:
    return [target.argv[0], "-c", PLAINTEXT_KERNEL, "{connection_file}"]


@pytest.mark.parametrize("why", ["undeclared", "plaintext-kernel"])
async def test_required_encryption_never_degrades(
    kernel_manager, target: TargetCase, why: str
) -> None:
    if why == "undeclared":  # the kernelspec's own setting, without the declaration
        spec = target.spec(transport_encryption="required")
        km = kernel_manager(target.provisioner, **spec)
    else:  # jupyter_client's setting; the kernel declares Curve but speaks plain text
        spec = {**target.spec(launch_timeout=30), "argv": _plaintext_argv(target)}
        km = kernel_manager(target.provisioner, **spec, metadata=CURVE)
        km.transport_encryption = "required"
    with pytest.raises(TransportEncryptionError) as info:
        await km.start_kernel()
    expected = "supported_encryption" if why == "undeclared" else "plain text"
    assert expected in str(info.value)
    count("encryption downgrades refused", target.name)

    async def left() -> list[str]:
        # (jupyter_client keeps its own connection file after a failed start)
        found = await resolve(target.leftovers(km.kernel_id))
        held = ClusterPortCache.instance().held()
        return [item for item in found if item != km.connection_file] + [
            f"port {port} on {host}" for host, ports in held.items() for port in ports
        ]

    await wait_for_no_leftovers(left, f"kernel {km.kernel_id}")


async def test_docker_kernel_without_curve_support_fails(kernel_manager, docker_client) -> None:
    """A real ipykernel 6.17 (the rootfs's own, in the base image) cannot encrypt."""
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        skip_or_fail("docker", f"image {BASE_IMAGE} is missing; run images/build-test-image.sh")
    config = {"image": BASE_IMAGE, "transport_encryption": "required", "sweep_on_start": False}
    km = kernel_manager("cluster-docker-provisioner", config, argv=CONTAINER_ARGV, metadata=CURVE)
    with pytest.raises(TransportEncryptionError, match="plain text"):
        await km.start_kernel()
    found = docker_client.containers.list(
        all=True, filters={"label": f"cluster-provisioners.kernel-id={km.kernel_id}"}
    )
    assert found == []


async def test_local_fallback_stays_encrypted(kernel_manager) -> None:
    """A kernel that falls back to a local process keeps the kernelspec's encryption."""
    from tests.helpers import LOCAL_ARGV

    config = {
        "image": "unused",
        "docker_host": "unix:///nonexistent/cluster-provisioners/docker.sock",
        "fallback": "local",
        "transport_encryption": "required",
    }
    km = kernel_manager("cluster-docker-provisioner", config, argv=LOCAL_ARGV, metadata=CURVE)
    await km.start_kernel()
    try:
        assert km.provisioner.engine.fallback_for
        assert km.curve_publickey is not None
        out, wire = await execute_recorded(km, "print('fallback' + '-canary')")
        assert out["stdout"] == "fallback-canary\n"
        assert b"fallback-canary" not in wire
    finally:
        await km.shutdown_kernel()


def test_kernelspec_install_encrypts_a_local_kernel_by_default(tmp_path: Path) -> None:
    """A first-time user's local kernelspec runs with CurveZMQ (this Python's ipykernel
    can), so ipykernel's plain-TCP warning does not greet them; --no-encrypt opts out."""
    kernel_dir = tmp_path / "share" / "jupyter" / "kernels"
    warning = "running over TCP without encryption"
    for name, flags, encrypted in (("py-default", [], True), ("py-off", ["--no-encrypt"], False)):
        result = cli("kernelspec", "install", name, "--prefix", str(tmp_path), *flags)
        assert result.returncode == 0, result.stderr
        spec = json.loads((kernel_dir / name / "kernel.json").read_text())
        config = spec["metadata"]["kernel_provisioner"]["config"]
        assert (config.get("transport_encryption") == "required") is encrypted, spec
        assert ("supported_encryption" in spec["metadata"]) is encrypted, spec
        run = cli("run", "--kernel-dir", str(kernel_dir), "--kernel", name, "-c", "print(7)")
        assert run.returncode == 0 and run.stdout.strip().endswith("7"), run.stderr
        assert (warning in run.stderr + run.stdout) is not encrypted, run.stderr
    remote = cli(
        "kernelspec",
        "install",
        "py-remote",
        "--prefix",
        str(tmp_path),
        "--target",
        "ssh",
        "--set",
        "host=127.0.0.1",
    )
    assert remote.returncode == 0, remote.stderr  # its interpreter is not this one: opt-in
    spec = json.loads((kernel_dir / "py-remote" / "kernel.json").read_text())
    assert "transport_encryption" not in spec["metadata"]["kernel_provisioner"]["config"]


def test_kernelspec_install_encrypt(tmp_path: Path) -> None:
    result = cli("kernelspec", "install", "py-curve", "--prefix", str(tmp_path), "--encrypt")
    assert result.returncode == 0, result.stderr
    kernel_dir = tmp_path / "share" / "jupyter" / "kernels"
    spec = json.loads((kernel_dir / "py-curve" / "kernel.json").read_text())
    assert spec["metadata"]["supported_encryption"] == ["curve"]
    assert spec["metadata"]["kernel_provisioner"]["config"]["transport_encryption"] == "required"
    # the kernel's own connection file holds the keypair (ipykernel 7.4 keeps it)
    code = "from ipykernel.kernelapp import IPKernelApp as A; print(A.instance().curve_publickey)"
    run = cli("run", "--kernel-dir", str(kernel_dir), "--kernel", "py-curve", "-c", code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("b'") and "None" not in run.stdout

    script = tmp_path / "plaintext_kernel.py"
    script.write_text(PLAINTEXT_KERNEL)
    argv = [sys.executable, str(script), "{connection_file}"]
    result = cli(
        "kernelspec", "install", "py-plain", "--prefix", str(tmp_path), "--encrypt", "--", *argv
    )
    assert result.returncode == 0, result.stderr
    run = cli("run", "--kernel-dir", str(kernel_dir), "--kernel", "py-plain", "-c", "1")
    assert run.returncode != 0
    assert "TransportEncryptionError" in run.stderr or "plain text" in run.stderr

"""Kernels in pods, against the ``kube`` API (the in-repo double, or a real cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from provisioners.exceptions import KernelStartError
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient
from provisioners.k8s.engine import PodEngine
from provisioners.k8s.provisioner import KubernetesClusterProvisioner, sweep_orphans
from provisioners.lifecycle.owner import ServerIdentity
from tests.helpers import KUBERNETES_PROVISIONER, Kube, execute, skip_or_fail, write_kernelspec
from tests.helpers.kube import dead_identity, get_pod, no_leftovers, pod_of, provisioner_of

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

MakeKM = Callable[..., AsyncKernelManager]


async def test_kernel_in_a_pod_via_port_forward(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(connection_mode="port-forward"), **kube.spec()
    )
    await km.start_kernel(env={"KERNEL_USERNAME": "alice@example.com"})
    assert km.get_connection_info()["ip"] == "127.0.0.1"
    code = "import os; print(6 * 7, os.getuid(), os.environ['KERNEL_USERNAME'])"
    result = await execute(km, code)
    assert result["status"] == "ok", result
    assert result["stdout"].split() == ["42", "1000", "alice@example.com"]

    key = km.session.key.decode()
    pod = await get_pod(kube_api, kube, pod_of(km).pod_name)
    assert key not in json.dumps(pod), "the HMAC key is in the pod"
    assert key not in caplog.text, "the HMAC key was logged"
    assert pod["metadata"]["labels"][m.LABEL_MANAGED_BY] == m.MANAGED_BY
    assert pod["metadata"]["labels"][m.LABEL_USERNAME] != "alice@example.com"  # sanitized
    secret_path = f"/api/v1/namespaces/{kube.namespace}/secrets/{pod_of(km).secret_name}"
    secret = await kube_api.request("GET", secret_path)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    # The kernel's own copy of the connection file: private to it and rewritable.
    check = (
        f"import os, stat; st = os.stat({m.CONNECTION_FILE!r}); "
        "print(oct(stat.S_IMODE(st.st_mode)), st.st_uid)"
    )
    assert (await execute(km, check))["stdout"].split() == ["0o600", "1000"]

    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_kernel_in_a_pod_via_pod_ip(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    config = kube.config(connection_mode="pod-ip", pod_ip_relay=False)
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
    await km.start_kernel()
    ip = km.get_connection_info()["ip"]
    assert ip == pod_of(km).pod_ip and ip not in ("", "127.0.0.1")
    if not await _tcp_reachable(ip, km.get_connection_info()["shell_port"]):
        await km.shutdown_kernel(now=True)
        skip_or_fail("k8s", f"pod IP {ip} is not routable from this machine")
    result = await execute(km, "print('direct')")
    assert result["stdout"] == "direct\n", result
    await km.shutdown_kernel()


async def _tcp_reachable(host: str, port: int, wait: float = 5.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return True
    return False


async def test_interrupt_in_signal_mode_execs_kill_in_the_pod(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec(interrupt_mode="signal"))
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("import time; time.sleep(60)")
        while True:  # wait until the cell runs
            msg = await kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "execute_input":
                break
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=15)
        while reply["parent_header"].get("msg_id") != msg_id:  # a late kernel_info_reply
            reply = await kc.get_shell_msg(timeout=15)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10
    finally:
        kc.stop_channels()
    assert (await execute(km, "print('alive')"))["stdout"] == "alive\n"
    await km.shutdown_kernel()


async def test_restart_makes_a_new_pod_on_the_same_ports(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec())
    await km.start_kernel()
    prov = provisioner_of(km)
    first_pod, first_ports = pod_of(km).pod_name, list(prov.engine.ports)
    await execute(km, "x = 1")
    await km.restart_kernel()
    assert pod_of(km).pod_name != first_pod
    assert list(prov.engine.ports) == first_ports
    result = await execute(km, "print('x' in globals())")
    assert result["stdout"] == "False\n", result
    await km.shutdown_kernel()


async def test_a_bad_image_fails_fast_with_the_pull_error(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    """The start fails as soon as the pull error shows, although the kubelet takes its
    time to remove the pod (up to 53 s on a real one; the double lingers too): the
    removal goes on in the background, and then nothing is left, port records included."""
    config = kube.config(image="cluster-provisioners.invalid/no-such-image:0")
    config["image_pull_policy"] = "IfNotPresent"
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        await km.start_kernel()
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f} s"
    text = str(info.value)
    assert any(r in text for r in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")), text
    assert "no-such-image" in text
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


#: A "server" whose kernel start fails on a bad image, and which then stops at once
#: (its event loop, and the background removal on it, end with it).
STOPS_AFTER_A_BAD_IMAGE = """
import asyncio, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from provisioners.lifecycle import leftovers

async def main():
    ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    km = AsyncKernelManager(kernel_name="bad", kernel_spec_manager=ksm)
    try:
        await km.start_kernel()
    except Exception as exc:
        print(km.kernel_id, len(leftovers.pending()), type(exc).__name__, flush=True)

asyncio.run(main())
"""


async def test_a_server_stopping_after_a_bad_image_leaves_nothing(
    kube: Kube, kube_api: KubeClient, tmp_path: Path
) -> None:
    """The start failed at once and the server stopped before the pod was gone: the
    cluster finishes the removal it accepted (pod and Secret), and the port records go
    with the server's process."""
    config = kube.config(image="cluster-provisioners.invalid/no-such-image:0")
    write_kernelspec(tmp_path, "bad", KUBERNETES_PROVISIONER, config, **kube.spec())
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STOPS_AFTER_A_BAD_IMAGE,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out, err = await asyncio.wait_for(server.communicate(), 120)
    assert server.returncode == 0, err.decode()[-2000:]
    kernel_id, pending, error = out.decode().split()
    assert error == "KernelStartError", out
    assert pending == "1", "the pod's removal was not pending when the server stopped"
    await no_leftovers(kube_api, kube.namespace, kernel_id)


async def test_a_restarted_server_reconnects_from_provisioner_info(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec())
    await km.start_kernel()
    await execute(km, "marker = 'still here'")
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
    pod = pod_of(km).pod_name
    # "Restart the server": a new manager and provisioner that only know the saved info.
    km2 = AsyncKernelManager(kernel_name=km.kernel_name, kernel_spec_manager=km.kernel_spec_manager)
    km2.kernel_id = km.kernel_id
    prov2 = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, km2.kernel_spec, parent=km2
    )
    await prov2.load_provisioner_info(info)
    assert isinstance(prov2, KubernetesClusterProvisioner) and isinstance(prov2.engine, PodEngine)
    assert prov2.engine.pod_name == pod
    assert await prov2.poll() is None
    km2.provisioner = prov2
    km2.load_connection_info(prov2.connection_info)
    km2.session.key = prov2.connection_info["key"]
    result = await execute(km2, "print(marker)")
    assert result["stdout"] == "still here\n", result
    await km2.shutdown_kernel(now=True)
    assert await km.provisioner.poll() is not None
    await km.provisioner.cleanup(restart=False)
    # Info about a pod that is gone loads as a dead kernel, without error.
    prov3 = KernelProvisionerFactory.instance().create_provisioner_instance(
        km.kernel_id, km2.kernel_spec, parent=None
    )
    await prov3.load_provisioner_info(info)
    assert not prov3.has_process and await prov3.poll() is not None
    await prov3.cleanup(restart=False)


async def test_two_concurrent_kernels_share_one_api_client(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    kms = [kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec()) for _ in range(2)]
    await asyncio.gather(*(km.start_kernel() for km in kms))
    engines = [pod_of(km) for km in kms]
    assert engines[0].client is engines[1].client is not None
    results = await asyncio.gather(*(execute(km, "print(1 + 1)") for km in kms))
    assert [r["stdout"] for r in results] == ["2\n", "2\n"]
    await asyncio.gather(*(km.shutdown_kernel() for km in kms))


async def test_orphan_sweep_deletes_only_dead_servers_pods(
    kube: Kube, kube_api: KubeClient
) -> None:
    ns = kube.namespace
    dead, alive = str(dead_identity()), str(ServerIdentity.current())
    elsewhere = "some-other-machine.1.1"  # cannot be checked from here: left alone
    created: list[tuple[str, str]] = []

    async def make(owner: str, tag: str) -> str:
        name = m.pod_name("sweeptest", tag)
        spec = m.KernelPod(
            name=name,
            namespace=ns,
            image=kube.image,
            command=("sleep", "60"),
            ports=(20001, 20002, 20003, 20004, 20005),
            kernel_id=f"sweep-{tag}",
            secret_name=m.secret_name_for(name),
            owner=owner,
            grace_period=0,
        )
        await kube_api.request("POST", f"/api/v1/namespaces/{ns}/pods", body=m.pod_manifest(spec))
        created.append(("pods", name))
        return name

    try:
        orphan = await make(dead, "dead")
        mine = await make(alive, "alive")
        other = await make(elsewhere, "other")
        loose = m.secret_manifest(
            "sweeptest-loose-connection", ns, b"{}", m.kernel_labels("sweep-loose", dead)
        )
        loose["metadata"]["annotations"] = m.kernel_annotations("sweep-loose", dead)
        await kube_api.request("POST", f"/api/v1/namespaces/{ns}/secrets", body=loose)
        created.append(("secrets", loose["metadata"]["name"]))

        swept = await sweep_orphans(kube_api, ns, logging.getLogger("test"))
        assert orphan in swept and "sweeptest-loose-connection" in swept
        assert mine not in swept and other not in swept
        await get_pod(kube_api, kube, mine)
        await get_pod(kube_api, kube, other)
    finally:
        for kind, name in created:
            path = f"/api/v1/namespaces/{ns}/{kind}/{name}"
            with contextlib.suppress(Exception):
                await kube_api.request("DELETE", path, query=[("gracePeriodSeconds", "0")])
        for kind, name in created:
            if kind == "pods":
                await _wait_gone(kube_api, f"/api/v1/namespaces/{ns}/pods/{name}")


async def _wait_gone(api: KubeClient, path: str, wait: float = 15.0) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            await api.request("GET", path, retries=0)
        except Exception:
            return
        await asyncio.sleep(0.2)


async def test_an_unschedulable_pod_fails_fast_with_the_schedulers_reason(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    config = kube.config(gpus=1, gpu_resource="example.com/no-such-device")
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
    started = time.monotonic()
    with pytest.raises(KernelStartError, match="Unschedulable") as info:
        await km.start_kernel()
    assert time.monotonic() - started < 5
    assert "example.com/no-such-device" in str(info.value)


async def test_a_kernel_that_exits_fails_the_start_with_its_log(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    argv = ["python3", "-c", "import sys; print('boom: no kernel here'); sys.exit(3)"]
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec(argv=argv))
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        await km.start_kernel()
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert "exited with code 3" in text and "boom: no kernel here" in text, text
    assert text.splitlines()[0] == "The kernel exited with code 3 while starting.", text


@pytest.mark.parametrize(
    ("verb", "resource", "expect"),
    [
        ("create", "pods", "Forbidden (check the RBAC rules)"),
        ("create", "secrets", "Forbidden (check the RBAC rules)"),
        ("*", "pods/portforward", "grant pods/portforward"),
    ],
)
async def test_forbidden_fails_at_once_and_names_the_rbac_problem(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    verb: str,
    resource: str,
    expect: str,
) -> None:
    if kube.forbid is None:
        pytest.skip("needs an API that can be told to refuse (the API double's deny rules)")
    config = kube.config(connection_mode="port-forward", launch_timeout=20.0)
    km = kernel_manager(KUBERNETES_PROVISIONER, config, **kube.spec())
    denial = kube.forbid(verb, resource)
    started = time.monotonic()
    try:
        with pytest.raises(KernelStartError) as info:
            await km.start_kernel()
    finally:
        denial.lift()
    assert time.monotonic() - started < 10
    assert expect in str(info.value) and "forbidden" in str(info.value), info.value


async def test_a_pod_deleted_behind_our_back_is_a_dead_kernel(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(), **kube.spec())
    await km.start_kernel()
    assert await km.is_alive()
    path = f"/api/v1/namespaces/{kube.namespace}/pods/{pod_of(km).pod_name}"
    await kube_api.request("DELETE", path, query=[("gracePeriodSeconds", "0")])
    deadline = time.monotonic() + 15
    while await km.is_alive():
        assert time.monotonic() < deadline, "poll() never noticed the pod was gone"
        await asyncio.sleep(0.1)
    await km.shutdown_kernel(now=True)


async def test_host_network_ports_are_read_from_our_pods_annotations(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM
) -> None:
    km = kernel_manager(KUBERNETES_PROVISIONER, kube.config(host_network=True), **kube.spec())
    await km.start_kernel()
    prov = provisioner_of(km)
    pod = await get_pod(kube_api, kube, pod_of(km).pod_name)
    assert pod["spec"]["hostNetwork"] is True
    node = pod["spec"]["nodeName"]
    assert (await execute(km, "print('on the node')"))["stdout"] == "on the node\n"
    # Another server pinning kernels to that node sees these ports as taken there.
    config = kube.config(host_network=True, node_name=node)
    other = KubernetesClusterProvisioner(
        kernel_id="0ddba11-0000-4000-8000-000000000001", kernel_spec=km.kernel_spec, **config
    )
    await other.check_engine()
    try:
        assert other.engine.allocation_host() == f"kubernetes-node:{node}"
        (source,) = other.engine.port_sources()
        assert set(prov.engine.ports) <= source.ports_in_use(other.engine.allocation_host())
    finally:
        await other.cleanup()
    await km.shutdown_kernel()

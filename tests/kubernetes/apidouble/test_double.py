"""The Kubernetes API double, driven only through real clients: kubernetes_asyncio, and
a small raw aiohttp websocket client for port-forward (kubernetes_asyncio has none)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.stream import WsApiClient

from tests.helpers import KERNEL_TEST_IMAGE
from tests.kubernetes.apidouble.double import K8sDouble
from tests.kubernetes.apidouble.kubelet import PULL_FAILURES

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(120)]

ECHO_SERVER = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080)); s.listen()
print("listening on 8080", flush=True)
def serve(c):
    while (data := c.recv(65536)):
        c.sendall(data.upper())
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": KERNEL_TEST_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "double-test"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [container],
            **spec,
        },
    }


async def wait_pod(
    api: client.CoreV1Api, ns: str, name: str, done: Callable[[Any], bool], timeout: float = 30
) -> Any:
    """Watch ``name`` until ``done(pod)``; return that pod."""
    async with asyncio.timeout(timeout):
        while True:
            w = watch.Watch()
            async with w.stream(
                api.list_namespaced_pod,
                ns,
                field_selector=f"metadata.name={name}",
                timeout_seconds=int(timeout),
            ) as stream:
                async for event in stream:
                    if event["type"] != "DELETED" and done(event["object"]):
                        return event["object"]


async def wait_deleted(api: client.CoreV1Api, ns: str, name: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await api.read_namespaced_pod(name, ns)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            await asyncio.sleep(0.1)


def waiting_reason(pod: Any) -> str | None:
    statuses = pod.status.container_statuses or []
    return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None


@asynccontextmanager
async def running_pod(
    api: client.CoreV1Api, ns: str, manifest: dict[str, Any]
) -> AsyncIterator[Any]:
    """Create a pod, wait for Running with a podIP, delete it (grace 0) afterwards."""
    name = manifest["metadata"]["name"]
    await api.create_namespaced_pod(ns, manifest)
    try:
        yield await wait_pod(
            api, ns, name, lambda p: p.status.phase == "Running" and bool(p.status.pod_ip)
        )
    finally:
        await api.delete_namespaced_pod(name, ns, grace_period_seconds=0)


class RawClient:
    """Server URL, TLS context and token from the kubeconfig, for raw websockets."""

    def __init__(self, kubeconfig: str) -> None:
        config = yaml.safe_load(open(kubeconfig).read())  # noqa: SIM115
        cluster = config["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = config["users"][0]["user"]["token"]
        self.ssl: ssl.SSLContext | bool = False
        if "certificate-authority-data" in cluster:
            self.ssl = ssl.create_default_context(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )

    @asynccontextmanager
    async def websocket(
        self, path: str, protocols: tuple[str, ...]
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        url = self.server.replace("http", "ws", 1) + path
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                url,
                protocols=protocols,
                ssl=self.ssl,
                headers={"Authorization": f"Bearer {self.token}"},
            ) as ws,
        ):
            yield ws

    async def get(self, path: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.server + path, ssl=self.ssl, headers=headers) as resp,
        ):
            return resp.status, await resp.json()


async def read_channels(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 15
) -> dict[int, bytes]:
    """Collect every frame's payload by channel until the server closes."""
    out: dict[int, bytes] = {}
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                out[msg.data[0]] = out.get(msg.data[0], b"") + msg.data[1:]
    return out


async def test_pod_runs_with_logs_exec_and_port_forward(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    raw = RawClient(k8s_double.kubeconfig)
    started = time.monotonic()
    async with running_pod(api, ns, pod_manifest("echo", ["python3", "-c", ECHO_SERVER])) as pod:
        assert time.monotonic() - started < 10
        assert pod.spec.node_name == "double-node-1"
        assert pod.status.host_ip and pod.status.pod_ips[0].ip == pod.status.pod_ip
        conditions = {c.type: c.status for c in pod.status.conditions}
        assert (
            conditions["Ready"] == conditions["PodScheduled"] == conditions["Initialized"] == "True"
        )
        status = pod.status.container_statuses[0]
        assert (
            status.ready
            and status.state.running.started_at
            and status.container_id.startswith("docker://")
        )

        async with asyncio.timeout(10):
            while "listening" not in (
                log := await api.read_namespaced_pod_log("echo", ns, tail_lines=5)
            ):
                await asyncio.sleep(0.1)
        assert log == "listening on 8080\n"

        async with WsApiClient(api.api_client.configuration) as ws_api:
            out = await client.CoreV1Api(ws_api).connect_get_namespaced_pod_exec(
                "echo", ns, command=["echo", "hi"], stdout=True, stderr=True, stdin=False, tty=False
            )
        assert out == "hi\n"

        # port-forward: v4 channels, the port in the first frame of each channel, then data
        path = f"/api/v1/namespaces/{ns}/pods/echo/portforward?ports=8080"
        async with raw.websocket(path, ("v4.channel.k8s.io",)) as ws:
            assert ws.protocol == "v4.channel.k8s.io"
            first = sorted([await ws.receive_bytes(), await ws.receive_bytes()])
            assert first == [b"\x00" + struct.pack("<H", 8080), b"\x01" + struct.pack("<H", 8080)]
            await ws.send_bytes(b"\x00ping")
            assert await ws.receive_bytes() == b"\x00PING"
            await ws.send_bytes(b"\x00" + b"x" * 200_000)
            received = b""
            while len(received) < 200_000:
                received += (await ws.receive_bytes())[1:]
            assert received == b"X" * 200_000

        # a refused port: the error channel says so, then the server closes
        path = f"/api/v1/namespaces/{ns}/pods/echo/portforward?ports=9"
        async with raw.websocket(path, ("v4.channel.k8s.io",)) as ws:
            frames = await read_channels(ws)
        assert frames[0] == struct.pack("<H", 9)
        assert frames[1][:2] == struct.pack("<H", 9) and b"connection refused" in frames[1]

        # like the kubelet, portforward.k8s.io alone is not a websocket subprotocol
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with raw.websocket(
                f"/api/v1/namespaces/{ns}/pods/echo/portforward?ports=8080", ("portforward.k8s.io",)
            ):
                pass
        assert refused.value.status == 403


async def test_exec_status_channel(k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    raw = RawClient(k8s_double.kubeconfig)
    async with running_pod(api, ns, pod_manifest("execs", ["sleep", "300"])):
        cmd = "&".join(
            f"command={c}" for c in ("sh", "-c", "echo%20out;echo%20err%3E%262;exit%207")
        )
        path = f"/api/v1/namespaces/{ns}/pods/execs/exec?{cmd}&stdout=true&stderr=true"
        async with raw.websocket(path, ("v5.channel.k8s.io", "v4.channel.k8s.io")) as ws:
            assert ws.protocol == "v5.channel.k8s.io"
            frames = await read_channels(ws)
        assert frames[1] == b"out\n" and frames[2] == b"err\n"
        status = json.loads(frames[3])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]

        path = f"/api/v1/namespaces/{ns}/pods/execs/exec?command=true&stdout=1"
        async with raw.websocket(path, ("v4.channel.k8s.io",)) as ws:
            frames = await read_channels(ws)
        assert json.loads(frames[3]) == {"metadata": {}, "status": "Success"}

        path = f"/api/v1/namespaces/{ns}/pods/execs/exec?command=no-such-binary&stdout=1"
        async with raw.websocket(path, ("v4.channel.k8s.io",)) as ws:
            frames = await read_channels(ws)
        status = json.loads(frames[3])
        assert (
            status["reason"] == "InternalError" and "executable file not found" in status["message"]
        )


async def test_delete_with_grace(k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    manifest = pod_manifest("graceful", ["sleep", "300"])
    await api.create_namespaced_pod(ns, manifest)
    await wait_pod(api, ns, "graceful", lambda p: p.status.phase == "Running")
    started = time.monotonic()
    deleted = await api.delete_namespaced_pod(
        "graceful", ns, grace_period_seconds=2, propagation_policy="Background"
    )
    assert (
        deleted.metadata.deletion_timestamp and deleted.metadata.deletion_grace_period_seconds == 2
    )
    await wait_deleted(api, ns, "graceful")
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 10  # sleep as PID 1 ignores SIGTERM: the grace period runs out
    events = await api.list_namespaced_event(
        ns, field_selector=f"involvedObject.uid={deleted.metadata.uid}"
    )
    assert "Killing" in {e.reason for e in events.items}
    assert k8s_double.leftovers() == []


async def test_secret_volume_mode_and_garbage_collection(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    manifest = pod_manifest(
        "with-secret",
        ["sleep", "300"],
        container={"volumeMounts": [{"name": "conn", "mountPath": "/etc/conn"}]},
        volumes=[{"name": "conn", "secret": {"secretName": "conn-secret", "defaultMode": 0o400}}],
    )
    created = await api.create_namespaced_pod(ns, manifest)
    # the Secret does not exist yet: the pod waits in ContainerCreating with FailedMount
    pending = await wait_pod(
        api, ns, "with-secret", lambda p: waiting_reason(p) == "ContainerCreating"
    )
    assert pending.status.phase == "Pending"
    async with asyncio.timeout(10):
        while True:
            events = await api.list_namespaced_event(
                ns, field_selector="involvedObject.name=with-secret"
            )
            if any(
                e.reason == "FailedMount" and 'secret "conn-secret" not found' in e.message
                for e in events.items
            ):
                break
            await asyncio.sleep(0.1)
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "with-secret", "uid": created.metadata.uid}
    await api.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "conn-secret", "ownerReferences": [owner]},
            "data": {"connection.json": base64.b64encode(b'{"key": "k"}').decode()},
        },
    )
    await wait_pod(api, ns, "with-secret", lambda p: p.status.phase == "Running")
    async with WsApiClient(api.api_client.configuration) as ws_api:
        out = await client.CoreV1Api(ws_api).connect_get_namespaced_pod_exec(
            "with-secret",
            ns,
            stdout=True,
            stderr=True,
            command=[
                "sh",
                "-c",
                "stat -L -c '%a %u %g' /etc/conn/connection.json; cat /etc/conn/connection.json;"
                " touch /etc/conn/x 2>&1 | grep -o 'Read-only file system'",
            ],
        )
    assert out == '400 0 0\n{"key": "k"}Read-only file system\n'
    await api.delete_namespaced_pod("with-secret", ns, grace_period_seconds=0)
    async with asyncio.timeout(10):
        while True:
            try:
                await api.read_namespaced_secret("conn-secret", ns)
            except ApiException as exc:
                assert exc.status == 404
                break
            await asyncio.sleep(0.1)
    assert k8s_double.leftovers() == []


async def test_init_container_memory_volume_security_context(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    await api.create_namespaced_secret(
        ns, {"metadata": {"name": "init-secret"}, "stringData": {"k": "v"}}
    )
    try:
        manifest = pod_manifest(
            "with-init",
            ["sleep", "300"],
            container={
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work"},
                    {"name": "sec", "mountPath": "/sec"},
                ],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "GREETING", "value": "hello $(POD_IP)"},
                ],
            },
            securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
            volumes=[
                {"name": "work", "emptyDir": {"medium": "Memory"}},
                {"name": "sec", "secret": {"secretName": "init-secret", "defaultMode": 0o400}},
            ],
            initContainers=[
                {
                    "name": "copy",
                    "image": KERNEL_TEST_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "cp /sec/k /work/k && chmod 600 /work/k"],
                    "volumeMounts": [
                        {"name": "work", "mountPath": "/work"},
                        {"name": "sec", "mountPath": "/sec"},
                    ],
                }
            ],
        )
        async with running_pod(api, ns, manifest) as pod:
            init = pod.status.init_container_statuses[0]
            assert (
                init.state.terminated.exit_code == 0 and init.state.terminated.reason == "Completed"
            )
            async with WsApiClient(api.api_client.configuration) as ws_api:
                out = await client.CoreV1Api(ws_api).connect_get_namespaced_pod_exec(
                    "with-init",
                    ns,
                    stdout=True,
                    stderr=True,
                    command=[
                        "sh",
                        "-c",
                        "id -u; stat -c '%a %u' /work/k; cat /work/k; echo;"
                        " stat -L -c '%a %g' /sec/k; echo $GREETING;"
                        " df /work | tail -1 | cut -c1-5",
                    ],
                )
            assert out.split("\n")[:6] == [
                "1000",
                "600 1000",
                "v",
                "440 2000",
                f"hello {pod.status.pod_ip}",
                "tmpfs",
            ]
    finally:
        await api.delete_namespaced_secret("init-secret", ns)


async def test_missing_image_reports_err_image_pull_fast(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    image = "cluster-provisioners/no-such-image:1"
    manifest = pod_manifest("no-image", ["true"], container={"image": image})
    started = time.monotonic()
    await api.create_namespaced_pod(ns, manifest)
    try:
        pod = await wait_pod(
            api,
            ns,
            "no-image",
            lambda p: waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff"),
            timeout=10,
        )
        assert time.monotonic() - started < 2
        assert (
            pod.status.phase == "Pending"
            and image in pod.status.container_statuses[0].state.waiting.message
        )
        events = await api.list_namespaced_event(ns, field_selector="involvedObject.name=no-image")
        failed = [e for e in events.items if e.reason == "Failed" and e.type == "Warning"]
        assert any(image in e.message for e in failed)
        assert any(e.message == "Error: ErrImagePull" for e in failed)
        await wait_pod(
            api, ns, "no-image", lambda p: waiting_reason(p) == "ImagePullBackOff", timeout=5
        )
        # as on a real kubelet, busy with the pull, a delete takes long to complete
        linger = k8s_double.cluster.stuck_pull_removal
        deleted = time.monotonic()
        await api.delete_namespaced_pod("no-image", ns, grace_period_seconds=1)
        await asyncio.sleep(2)
        pod = await api.read_namespaced_pod("no-image", ns)
        assert pod.metadata.deletion_timestamp and waiting_reason(pod) in PULL_FAILURES
        await wait_deleted(api, ns, "no-image", timeout=linger + 15)
        assert time.monotonic() - deleted >= linger - 0.5
    finally:
        with contextlib.suppress(ApiException):
            await api.delete_namespaced_pod("no-image", ns, grace_period_seconds=0)


async def test_a_deleted_pod_goes_once_the_kubelet_confirms(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    """A pod whose process ends at SIGTERM shows its terminated container, deletion
    pending, for the double's ``removal_delay`` before the object goes (not at once)."""
    api, ns = k8s_core_api, k8s_double.namespace
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "print('up', flush=True); time.sleep(300)"
    )
    manifest = pod_manifest("quits", ["python3", "-c", code], terminationGracePeriodSeconds=30)
    await api.create_namespaced_pod(ns, manifest)
    try:
        await wait_pod(api, ns, "quits", lambda p: p.status.phase == "Running")
        await asyncio.sleep(0.5)  # its SIGTERM handler is set
        deleted = time.monotonic()
        await api.delete_namespaced_pod("quits", ns, grace_period_seconds=30)
        pod = await wait_pod(
            api,
            ns,
            "quits",
            lambda p: bool(p.status.container_statuses[0].state.terminated),
            timeout=10,
        )
        assert pod.metadata.deletion_timestamp
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
        await wait_deleted(api, ns, "quits", timeout=20)
        elapsed = time.monotonic() - deleted
        delay = k8s_double.cluster.removal_delay
        assert delay - 0.2 <= elapsed < delay + 8, elapsed  # not its 30 s grace period
    finally:
        with contextlib.suppress(ApiException):
            await api.delete_namespaced_pod("quits", ns, grace_period_seconds=0)
    assert k8s_double.leftovers() == []


async def test_unschedulable_pods(k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    node = (await api.list_node()).items[0]
    assert node.metadata.labels["kubernetes.io/os"] == "linux"
    assert node.metadata.labels["kubernetes.io/hostname"] == node.metadata.name == "double-node-1"
    manifests = {
        "wrong-node": (
            pod_manifest("wrong-node", ["true"], nodeSelector={"disktype": "ssd"}),
            "didn't match Pod's node affinity/selector",
        ),
        "wants-gpu": (
            pod_manifest(
                "wants-gpu", ["true"], container={"resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ),
            "Insufficient nvidia.com/gpu",
        ),
    }
    try:
        for name, (manifest, message) in manifests.items():
            await api.create_namespaced_pod(ns, manifest)
            pod = await wait_pod(
                api,
                ns,
                name,
                lambda p: any(
                    c.type == "PodScheduled" and c.status == "False"
                    for c in p.status.conditions or []
                ),
                timeout=5,
            )
            cond = next(c for c in pod.status.conditions if c.type == "PodScheduled")
            assert cond.reason == "Unschedulable" and cond.message.startswith(
                "0/1 nodes are available: 1 "
            )
            assert (
                message in cond.message and pod.status.phase == "Pending" and not pod.spec.node_name
            )
            events = await api.list_namespaced_event(
                ns, field_selector=f"involvedObject.name={name}"
            )
            assert any(
                e.reason == "FailedScheduling" and message in e.message for e in events.items
            )
        k8s_double.set_node(resources={"nvidia.com/gpu": "1"})
        scheduled = await wait_pod(
            api, ns, "wants-gpu", lambda p: bool(p.spec.node_name), timeout=5
        )
        assert scheduled.spec.node_name == "double-node-1"
    finally:
        k8s_double.set_node(resources={})
        for name in manifests:
            await api.delete_namespaced_pod(name, ns, grace_period_seconds=0)


async def test_restart_policies(k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    crash = pod_manifest("crashy", ["sh", "-c", "echo boom; exit 3"], restartPolicy="Always")
    once = pod_manifest(
        "once",
        ["sh", "-c", "echo boom; exit 3"],
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    await api.create_namespaced_pod(ns, crash)
    await api.create_namespaced_pod(ns, once)
    try:
        pod = await wait_pod(api, ns, "crashy", lambda p: waiting_reason(p) == "CrashLoopBackOff")
        status = pod.status.container_statuses[0]
        assert status.restart_count >= 1 and status.last_state.terminated.exit_code == 3
        assert pod.status.phase == "Running"
        assert await api.read_namespaced_pod_log("crashy", ns, previous=True) == "boom\n"
        pod = await wait_pod(api, ns, "once", lambda p: p.status.phase == "Failed")
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason, terminated.message) == (
            3,
            "Error",
            "boom\n",
        )
    finally:
        for name in ("crashy", "once"):
            await api.delete_namespaced_pod(name, ns, grace_period_seconds=0)


async def test_api_errors_auth_and_rbac(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    raw = RawClient(k8s_double.kubeconfig)
    code, body = await raw.get(f"/api/v1/namespaces/{ns}/pods", token=None)
    assert (code, body["reason"], body["kind"]) == (401, "Unauthorized", "Status")

    with pytest.raises(ApiException) as bad:
        await api.create_namespaced_pod(ns, pod_manifest("Bad_Name", ["true"]))
    status = json.loads(bad.value.body)
    assert bad.value.status == 422 and status["reason"] == "Invalid"
    assert status["details"]["causes"][0]["field"] == "metadata.name"
    with pytest.raises(ApiException) as missing_ns:
        await api.create_namespaced_pod("no-such-namespace", pod_manifest("p", ["true"]))
    assert missing_ns.value.status == 404

    await api.create_namespaced_secret(ns, {"metadata": {"name": "dup"}, "data": {}})
    try:
        with pytest.raises(ApiException) as dup:
            await api.create_namespaced_secret(ns, {"metadata": {"name": "dup"}, "data": {}})
        assert dup.value.status == 409 and json.loads(dup.value.body)["reason"] == "AlreadyExists"
        patched = await api.patch_namespaced_secret("dup", ns, {"metadata": {"labels": {"a": "b"}}})
        assert patched.metadata.labels == {"a": "b"}
    finally:
        await api.delete_namespaced_secret("dup", ns)

    with k8s_double.forbid("create", "pods"):
        with pytest.raises(ApiException) as denied:
            await api.create_namespaced_pod(ns, pod_manifest("denied", ["true"]))
        status = json.loads(denied.value.body)
        assert denied.value.status == 403 and status["reason"] == "Forbidden"
        assert status["message"] == (
            f'pods is forbidden: User "{k8s_double.user}" cannot create resource '
            f'"pods" in API group "" in the namespace "{ns}"'
        )
    assert k8s_double.cluster.deny == []


async def test_watch_resume_and_expiry(
    k8s_double: K8sDouble, k8s_core_api: client.CoreV1Api
) -> None:
    api, ns = k8s_core_api, k8s_double.namespace
    listed = await api.list_namespaced_secret(ns, label_selector="suite in (watch)")
    await api.create_namespaced_secret(
        ns, {"metadata": {"name": "watched", "labels": {"suite": "watch"}}}
    )
    try:
        w = watch.Watch()
        async with w.stream(
            api.list_namespaced_secret,
            ns,
            label_selector="suite in (watch)",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=5,
        ) as stream:
            async for event in stream:
                assert (event["type"], event["object"].metadata.name) == ("ADDED", "watched")
                break
        k8s_double.compact()
        with pytest.raises(ApiException) as expired:
            async with watch.Watch().stream(
                api.list_namespaced_secret,
                ns,
                resource_version=listed.metadata.resource_version,
                timeout_seconds=5,
            ) as stream:
                async for _event in stream:
                    pass
        assert expired.value.status == 410
    finally:
        await api.delete_namespaced_secret("watched", ns)

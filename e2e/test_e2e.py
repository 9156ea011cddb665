"""End-to-end tests against a real Kubernetes cluster; e2e/run.sh sets them up.

(a) The chart's Jupyter Server, reached through a `kubectl port-forward` of its Service
    (E2E_SERVER_URL, E2E_TOKEN): start a kernel with the REST API, run code over the kernel
    websocket, interrupt it, delete it; keep one websocket open across a REST restart and
    an automatic restart. Its kernels run in the chart's kernel namespace
    (E2E_KERNEL_NAMESPACE, by default derived from E2E_NAMESPACE and E2E_RELEASE as the
    chart derives it).
(b) A notebook run with nbclient through a local KernelManager whose kernelspec selects
    cluster-kubernetes-provisioner: from outside the cluster the provisioner reaches the
    kernel pod through pods/portforward (E2E_KUBECONFIG, E2E_KERNEL_IMAGE, E2E_NAMESPACE).

Without a cluster (E2E_KUBECONFIG unset, or kind missing) every test skips and says why.
These tests are not under tests/, so a plain `pytest` never collects them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

SERVER_URL = os.environ.get("E2E_SERVER_URL", "").rstrip("/")
TOKEN = os.environ.get("E2E_TOKEN", "")
KUBECONFIG = os.environ.get("E2E_KUBECONFIG", "")
NAMESPACE = os.environ.get("E2E_NAMESPACE", "cp-e2e")
RELEASE = os.environ.get("E2E_RELEASE", "e2e")
# The chart's default kernel namespace: "<namespace>-<release>", cut to 55 characters, then
# "-kernels" (charts/cluster-provisioners/templates/_helpers.tpl).
KERNEL_NAMESPACE = os.environ.get("E2E_KERNEL_NAMESPACE") or (
    f"{NAMESPACE}-{RELEASE}"[:55].rstrip("-") + "-kernels"
)
KERNEL_IMAGE = os.environ.get("E2E_KERNEL_IMAGE", "cluster-provisioners/kernel:e2e")
KUBECTL = os.environ.get("E2E_KUBECTL", "")
KERNEL_SELECTOR = (
    "app.kubernetes.io/managed-by=cluster-provisioners,app.kubernetes.io/component=kernel"
)


def _no_cluster_reason() -> str | None:
    if not KUBECONFIG:
        if shutil.which("kind") is None:
            return (
                "no cluster: kind is not installed and E2E_KUBECONFIG is not set (run "
                "e2e/run.sh with Docker and kind, or with E2E_KUBECONFIG for an existing cluster)"
            )
        return (
            "no cluster: E2E_KUBECONFIG is not set (e2e/run.sh creates a kind cluster and sets it)"
        )
    if not Path(KUBECONFIG).is_file():
        return f"no cluster: E2E_KUBECONFIG={KUBECONFIG} is not a file"
    return None


NO_CLUSTER = _no_cluster_reason()
pytestmark = [
    pytest.mark.k8s,
    pytest.mark.timeout(900),
    pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or ""),
]
needs_server = pytest.mark.skipif(
    NO_CLUSTER is None and not (SERVER_URL and TOKEN),
    reason="E2E_SERVER_URL / E2E_TOKEN not set (e2e/run.sh port-forwards the chart's Service)",
)


# --------------------------------------------------------------------------- helpers


def api(method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    """One REST call to the server; returns (status, decoded JSON or None)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    request = urllib.request.Request(SERVER_URL + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def kernel_pods(namespace: str = KERNEL_NAMESPACE) -> list[dict[str, Any]]:
    """Kernel pods in namespace, by default the server's kernel namespace (needs E2E_KUBECTL)."""
    out = subprocess.run(
        [KUBECTL, "get", "pods", "-n", namespace, "-l", KERNEL_SELECTOR, "-o", "json"],
        env={**os.environ, "KUBECONFIG": KUBECONFIG},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [
        p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")
    ]


def wait_for_no_kernel_pod(
    name: str, namespace: str = KERNEL_NAMESPACE, timeout: float = 120
) -> None:
    """Wait until kernel pod name in namespace is gone (or being deleted)."""
    deadline = time.monotonic() + timeout
    while any(p["metadata"]["name"] == name for p in kernel_pods(namespace)):
        assert time.monotonic() < deadline, f"kernel pod {name} still exists after shutdown"
        time.sleep(2)


class KernelSocket:
    """The Jupyter kernel websocket protocol (JSON messages with a "channel" field)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.session = uuid.uuid4().hex
        self._seen: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, kernel_id: str) -> Any:
        """Context manager: the websocket of kernel_id (closed on exit)."""
        from websockets.sync.client import connect

        url = SERVER_URL.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
        return connect(
            url,
            additional_headers={"Authorization": f"token {TOKEN}"},
            open_timeout=60,
            max_size=None,
        )

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        """Send a shell request; returns its msg_id."""
        msg_id = uuid.uuid4().hex
        message = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "e2e",
                "session": self.session,
                "date": datetime.now(timezone.utc).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": "shell",
            "buffers": [],
        }
        self.ws.send(json.dumps(message))
        return msg_id

    @staticmethod
    def _execute_content(code: str) -> dict[str, Any]:
        return {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }

    def send_execute(self, code: str) -> str:
        return self.send("execute_request", self._execute_content(code))

    def recv(self, deadline: float, missing: str) -> dict[str, Any]:
        """The next message, by time.monotonic() deadline; else fails saying what is missing."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(missing)
        try:
            return json.loads(self.ws.recv(timeout=remaining))
        except TimeoutError:
            raise AssertionError(missing) from None

    def wait_for(self, msg_id: str, msg_type: str, timeout: float = 120) -> dict[str, Any]:
        """Read messages until one of msg_type answers msg_id; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(deadline, f"no {msg_type} for {msg_id} in {timeout:.0f} s")
            if message["parent_header"].get("msg_id") == msg_id:
                self._seen.append(message)
                if message["msg_type"] == msg_type:
                    return message

    def wait_for_status(self, state: str, timeout: float) -> float:
        """Read messages until a status message says state; returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            message = self.recv(deadline, f"no {state!r} status in {timeout:.0f} s")
            if (
                message["msg_type"] == "status"
                and message["content"].get("execution_state") == state
            ):
                return time.monotonic() - start

    def until_answering(self, timeout: float) -> float:
        """Ask for kernel_info until the kernel answers with its reply and its idle status,
        as a client must after an automatic restart: nothing says when the new kernel is up,
        and what it publishes before the websocket's iopub subscription reaches it is lost.
        Returns the seconds it took."""
        start = time.monotonic()
        while True:
            left = start + timeout - time.monotonic()
            try:
                self.request("kernel_info_request", {}, timeout=min(5.0, max(left, 0.1)))
                return time.monotonic() - start
            except AssertionError as exc:
                if time.monotonic() - start >= timeout:
                    raise AssertionError(
                        f"the kernel did not answer in {timeout:.0f} s: {exc}"
                    ) from None

    def fresh_kernel_pod(
        self, gone: str, restart: str, timeout: float, ask: float = 0
    ) -> tuple[str, float]:
        """After ``restart``: the pod of the kernel answering on this websocket, which must be
        a fresh one (``gone``, a variable of the old kernel, undefined). ``ask``: first ask
        for kernel_info for up to that many seconds, as after an automatic restart. Returns
        the pod and the seconds the kernel took to answer kernel_info (0 without ``ask``)."""
        code = f"import socket\nprint({gone!r} in globals(), socket.gethostname())"
        try:
            asked = self.until_answering(timeout=ask) if ask else 0.0
            reply, out = self.execute(code, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(
                f"no reply on the websocket kept open across {restart}: {exc}"
            ) from None
        assert reply["status"] == "ok", reply
        fresh, pod = out.split()
        assert fresh == "False", f"{restart} kept the old kernel's state (or none happened)"
        return pod, asked

    def execute(self, code: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
        """Run code; returns (execute_reply content, everything written to stdout)."""
        return self.request("execute_request", self._execute_content(code), timeout)

    def request(
        self, msg_type: str, content: dict[str, Any], timeout: float = 120
    ) -> tuple[dict[str, Any], str]:
        """Send a shell request and read until its reply and its idle status have come;
        returns (reply content, everything written to stdout)."""
        self._seen = []
        msg_id = self.send(msg_type, content)
        reply_type = msg_type.replace("_request", "_reply")
        reply = self.wait_for(msg_id, reply_type, timeout)
        # Outputs arrive on iopub before the kernel goes idle again.
        deadline = time.monotonic() + timeout
        while not any(
            m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            for m in self._seen
        ):
            message = self.recv(
                deadline, f"its {reply_type} came, but no idle status (iopub) in {timeout:.0f} s"
            )
            if message["parent_header"].get("msg_id") == msg_id:
                self._seen.append(message)
        stdout = "".join(
            m["content"]["text"]
            for m in self._seen
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )
        return reply["content"], stdout


# --------------------------------------------------------------------------- (a) the chart's server


@needs_server
def test_server_requires_the_token() -> None:
    status, _ = api("GET", "/api/kernels", token=None)
    assert status == 403
    status, _ = api("GET", "/api/kernels", token="not-the-token")
    assert status == 403


@needs_server
def test_kernelspecs_come_from_the_chart() -> None:
    status, listing = api("GET", "/api/kernelspecs")
    assert status == 200
    assert listing["default"] == "python3"
    spec = listing["kernelspecs"]["python3"]["spec"]
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "cluster-kubernetes-provisioner"
    assert provisioner["config"]["image"] == KERNEL_IMAGE


@needs_server
def test_kernel_over_rest_and_websocket() -> None:
    status, kernel = api("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, f"POST /api/kernels answered {status}"
    kernel_id = kernel["id"]
    pod_name = None
    try:
        with KernelSocket.connect(kernel_id) as ws:
            sock = KernelSocket(ws)
            reply, out = sock.execute(
                "import os, socket\n"
                "print('answer', 6 * 7)\n"
                "print('in-pod', 'KUBERNETES_SERVICE_HOST' in os.environ)\n"
                "print('host', socket.gethostname())\n"
                "print('uid', os.getuid())\n"
            )
            assert reply["status"] == "ok", reply
            assert "answer 42" in out
            assert "in-pod True" in out, "the kernel does not run in a pod"
            assert "uid 0\n" not in out, "the kernel runs as root"
            pod_name = out.split("host ", 1)[1].split()[0]
            if KUBECTL:
                assert pod_name in {p["metadata"]["name"] for p in kernel_pods()}

            # State is kept between executions.
            reply, out = sock.execute("x = 20\nprint(x + 1)")
            assert (reply["status"], out.strip()) == ("ok", "21")

            # Interrupt (the provisioner execs `kill -INT` in the pod).
            sock._seen = []
            msg_id = sock.send_execute("import time\ntime.sleep(600)")
            sock.wait_for(msg_id, "execute_input", timeout=60)
            time.sleep(1)
            status, _ = api("POST", f"/api/kernels/{kernel_id}/interrupt")
            assert status == 204
            reply = sock.wait_for(msg_id, "execute_reply", timeout=120)["content"]
            assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply

            # The kernel survives the interrupt.
            reply, out = sock.execute("print(x * 2)")
            assert (reply["status"], out.strip()) == ("ok", "40")
    finally:
        status, _ = api("DELETE", f"/api/kernels/{kernel_id}")
        assert status == 204
    status, kernels = api("GET", "/api/kernels")
    assert kernel_id not in {k["id"] for k in kernels}
    if KUBECTL and pod_name:
        wait_for_no_kernel_pod(pod_name)


@needs_server
def test_websocket_kept_open_across_restarts() -> None:
    """One websocket, never reconnected, gets its replies after a REST restart and after an
    automatic restart (the kernel process exits; the server's restarter starts it again).
    A request sent as the REST restart returns gets its reply, output and idle status. After
    an automatic restart the client asks until the kernel answers (nothing tells it when the
    restart is done), then its request gets all of them.

    JupyterLab and GatewayClient keep a kernel's websocket open for the life of a notebook,
    and Jupyter Server binds a websocket to the kernel's address only when it connects: the
    kernel must come back on the same address. The chart's server is in the cluster, so it
    reaches its kernels by pod IP, and a new pod has a new IP.
    """
    status, kernel = api("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, f"POST /api/kernels answered {status}"
    kernel_id = kernel["id"]
    pods: list[str] = []
    try:
        with KernelSocket.connect(kernel_id) as ws:
            sock = KernelSocket(ws)
            reply, out = sock.execute("import socket\nx = 1\nprint(socket.gethostname())")
            assert reply["status"] == "ok", reply
            pods.append(out.strip())

            # A restart through the REST API; the server answers once the kernel is back.
            began = time.monotonic()
            status, _ = api("POST", f"/api/kernels/{kernel_id}/restart")
            assert status == 200, f"POST .../restart answered {status}"
            rest_seconds = time.monotonic() - began
            pods.append(sock.fresh_kernel_pod("x", "a REST restart", timeout=60)[0])

            # The kernel process dies; the server's restarter starts a new kernel.
            reply, _ = sock.execute("y = 2")
            assert reply["status"] == "ok", reply
            sock.send_execute("import os\nos._exit(1)")
            sock.wait_for_status("restarting", timeout=60)
            pod, auto_seconds = sock.fresh_kernel_pod("y", "an automatic restart", 30, ask=120)
            pods.append(pod)
            print("kernel pods (start, REST restart, automatic restart):", pods)
            print(
                f"REST restart answered in {rest_seconds:.1f} s; after the automatic restart's "
                f"'restarting' status the kernel answered in {auto_seconds:.1f} s"
            )
    finally:
        status, _ = api("DELETE", f"/api/kernels/{kernel_id}")
        assert status == 204
    if KUBECTL:
        for pod in set(pods):
            wait_for_no_kernel_pod(pod)


# ------------------------------------------------------------------------- (b) local KernelManager


async def test_notebook_through_port_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(
        "provisioners.k8s.provisioner", reason="the Kubernetes provisioner is not importable"
    )
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    monkeypatch.setenv("KUBECONFIG", KUBECONFIG)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    name = "k8s-e2e"
    spec_dir = tmp_path / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "display_name": "Python 3 (kind e2e)",
                "language": "python",
                "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "metadata": {
                    "kernel_provisioner": {
                        "provisioner_name": "cluster-kubernetes-provisioner",
                        "config": {
                            "image": KERNEL_IMAGE,
                            "namespace": NAMESPACE,
                            "connection_mode": "port-forward",
                        },
                    }
                },
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# e2e\nA kernel in a pod, reached through port-forward."),
        nbformat.v4.new_code_cell("answer = 6 * 7\nanswer"),
        nbformat.v4.new_code_cell(
            "import os, socket\n"
            "print('in-pod', 'KUBERNETES_SERVICE_HOST' in os.environ)\n"
            "print('host', socket.gethostname())"
        ),
        nbformat.v4.new_code_cell("import sys\nprint(sys.version_info >= (3, 10))"),
    ]
    client = NotebookClient(nb, km=km, kernel_name=name, timeout=120, startup_timeout=600)
    try:
        await client.async_execute()
    finally:
        if km.has_kernel:
            await km.shutdown_kernel()

    result = nb.cells[1].outputs
    assert result[0]["output_type"] == "execute_result"
    assert result[0]["data"]["text/plain"] == "42"
    text = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "in-pod True" in text, text
    assert "".join(o.get("text", "") for o in nb.cells[3].outputs).strip() == "True"
    if KUBECTL:
        wait_for_no_kernel_pod(text.split("host ", 1)[1].split()[0], NAMESPACE)

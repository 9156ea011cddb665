"""Many users on the chart's one server, on a real cluster (issue 22); e2e/run.sh sets it up.

The release is upgraded with per-user identity (a token file Secret mapping two tokens to
alice and bob; the chart's own token stays the admin's) and a PersistentVolumeClaim per
user (`claim-{username}`), bound to hostPath PersistentVolumes this test creates (the
node has no storage provisioner). alice's kernel writes into her volume and holds a
variable; bob, over REST and over the websocket, can neither see, attach to, interrupt,
restart nor delete it, and his own kernel does not see alice's file; alice's second
kernel does. Everything it made is removed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e.helpers import ENV, MISSING, Forward, helm_upgrade
from tests.helpers.kube import hostpath_volume
from tests.jupyter_server import http, until_answering, ws_execute

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        bool(MISSING), reason=f"run through e2e/run.sh (E2E_{', E2E_'.join(MISSING)} unset)"
    ),
]
USERS = ("alice", "bob")
SECRET = "e2e-kernel-users"
VOLUME_ROOT = Path("/tmp/cluster-provisioners-e2e-volumes")
MOUNT = "/home/jovyan/work"


def cluster(*args: str, stdin: str | None = None) -> str:
    """kubectl without the release's namespace (cluster-scoped objects, -n given)."""
    proc = subprocess.run(
        [ENV["KUBECTL"], *args],
        env={**os.environ, "KUBECONFIG": ENV["KUBECONFIG"]},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


class User:
    """One user of the server: a token and the requests made with it."""

    def __init__(self, name: str, token: str, url: str) -> None:
        self.name, self.token, self.url = name, token, url

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, raw = http(method, self.url + path, self.token, body, timeout=120)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    async def websocket(self, kernel_id: str) -> Any:
        from websockets.asyncio.client import connect

        ws_url = self.url.replace("http", "ws", 1)
        session = uuid.uuid4().hex
        return session, await connect(
            f"{ws_url}/api/kernels/{kernel_id}/channels?session_id={session}",
            additional_headers={"Authorization": f"token {self.token}"},
            max_size=None,
        )

    async def run(self, kernel_id: str, code: str) -> dict[str, str]:
        session, ws = await self.websocket(kernel_id)
        async with ws:
            await until_answering(ws, session, timeout=120)
            return await ws_execute(ws, session, code, timeout=120)


@pytest.fixture
def per_user_release(forward: Forward) -> Any:
    namespace = ENV["KERNEL_NAMESPACE"]
    tokens = {name: secrets.token_urlsafe(24) for name in USERS}
    users_file = {tokens[name]: {"name": name, "groups": ["e2e"]} for name in USERS}
    for name in USERS:
        path = VOLUME_ROOT / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # the kernel runs as jovyan (1000)
        labels = {"e2e.cluster-provisioners/created-by": "test_multiuser"}
        volume = hostpath_volume(f"e2e-claim-{name}", str(path), namespace, f"claim-{name}", labels)
        cluster("apply", "-f", "-", stdin=json.dumps(volume))
    data = base64.b64encode(json.dumps(users_file).encode()).decode()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": ENV["NAMESPACE"]},
        "data": {"users.json": data},
    }
    cluster("apply", "-f", "-", stdin=json.dumps(secret))
    try:
        helm_upgrade(
            "access.enabled=true",
            f"access.tokenFile.existingSecret={SECRET}",
            "access.tokenFile.key=users.json",
            "access.quotas.maxKernelsPerUser=3",
            "kernels.userVolume.enabled=true",
            "kernels.userVolume.size=1Gi",
            f"kernels.userVolume.mountPath={MOUNT}",
        )
        forward.wait_for_kernels(set())
        yield {name: User(name, tokens[name], forward.url) for name in USERS}, namespace
    finally:
        helm_upgrade("access.enabled=false", "kernels.userVolume.enabled=false")
        for name in USERS:
            cluster("delete", "pvc", "-n", namespace, f"claim-{name}", "--ignore-not-found")
            cluster("delete", "pv", f"e2e-claim-{name}", "--ignore-not-found")
        cluster("delete", "secret", "-n", ENV["NAMESPACE"], SECRET, "--ignore-not-found")
        shutil.rmtree(VOLUME_ROOT, ignore_errors=True)


async def test_each_users_kernels_and_volume_are_theirs_alone(per_user_release: Any) -> None:
    users, namespace = per_user_release
    alice, bob = users["alice"], users["bob"]
    status, model = await asyncio.to_thread(alice.request, "POST", "/api/kernels", {})
    assert status == 201, model
    kid = model["id"]
    out = await alice.run(
        kid,
        f"secret = 'A-private-value'\n"
        f"open('{MOUNT}/note.txt', 'w').write('from alice')\n"
        "import os; print(os.environ['KERNEL_USERNAME'])",
    )
    assert out["stdout"] == "alice\n", out
    assert (VOLUME_ROOT / "alice" / "note.txt").read_text() == "from alice"
    pod = json.loads(cluster("get", "pods", "-n", namespace, "-o", "json"))["items"]
    mine = [p for p in pod if kid in json.dumps(p["metadata"])]
    assert mine and mine[0]["metadata"]["labels"]["cluster-provisioners/username"] == "alice"

    # bob: not listed, and every way at alice's kernel is a 404
    status, listed = await asyncio.to_thread(bob.request, "GET", "/api/kernels")
    assert status == 200 and kid not in json.dumps(listed), listed
    status, sessions = await asyncio.to_thread(bob.request, "GET", "/api/sessions")
    assert status == 200 and kid not in json.dumps(sessions), sessions
    for method, path, body in (
        ("GET", f"/api/kernels/{kid}", None),
        ("POST", f"/api/kernels/{kid}/interrupt", {}),
        ("POST", f"/api/kernels/{kid}/restart", {}),
        ("DELETE", f"/api/kernels/{kid}", None),
        ("POST", "/api/kernels", {"kernel_id": kid}),
    ):
        status, answer = await asyncio.to_thread(bob.request, method, path, body)
        assert status == 404, (method, path, status, answer)
    with pytest.raises(Exception) as refused:
        await bob.websocket(kid)
    assert "404" in str(refused.value), refused.value

    # bob's own kernel has his own volume, without alice's file
    status, model = await asyncio.to_thread(bob.request, "POST", "/api/kernels", {})
    assert status == 201, model
    bob_kid = model["id"]
    out = await bob.run(bob_kid, f"import os; print(sorted(os.listdir('{MOUNT}')))")
    assert out["stdout"] == "[]\n", out

    # alice's variable is intact, and her second kernel reads her file
    assert (await alice.run(kid, "print(secret)"))["stdout"] == "A-private-value\n"
    status, model = await asyncio.to_thread(alice.request, "POST", "/api/kernels", {})
    assert status == 201, model
    out = await alice.run(model["id"], f"print(open('{MOUNT}/note.txt').read())")
    assert out["stdout"] == "from alice\n", out
    claims = json.loads(cluster("get", "pvc", "-n", namespace, "-o", "json"))["items"]
    assert {c["metadata"]["name"] for c in claims} >= {"claim-alice", "claim-bob"}

    # the admin (the chart's token) sees all three
    status, raw = await asyncio.to_thread(
        http, "GET", alice.url + "/api/kernels", ENV["TOKEN"], None, 30
    )
    ids = {k["id"] for k in json.loads(raw)}
    assert {kid, bob_kid, model["id"]} <= ids
    for who, k in ((alice, kid), (bob, bob_kid), (alice, model["id"])):
        status, _ = await asyncio.to_thread(who.request, "DELETE", f"/api/kernels/{k}")
        assert status == 204

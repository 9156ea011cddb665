"""One gateway, many users, through a real JupyterHub (issue 22).

JupyterHub 6 (dummy authenticator, simple spawner) runs alice's and bob's single-user
servers in gateway mode against our server; each sends its own Hub token, which our
server resolves through the Hub (the ``gateway`` service, scope
``access:services!service=gateway``). alice's notebook runs in a Docker kernel that mounts
her own directory; bob, through his own server and straight at ours, over REST and the
websocket, can neither see, attach to, interrupt, restart nor delete it. The kernel count
and CPU quotas and bad launch parameters are refused with their messages; a Hub token
without the service's scope is refused. Kernels answer execute_requests throughout. The
same isolation holds for a Kubernetes kernel (the API double, or $KUBECONFIG's cluster)
with a PersistentVolumeClaim per user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from provisioners.docker import LABEL_KERNEL_ID
from provisioners.k8s import manifests as m
from provisioners.k8s.client import KubeClient, NotFound, resource_path
from tests.helpers import CONTAINER_ARGV, Kube, write_kernelspec
from tests.helpers.hub import (
    GROUP_KERNELSPEC,
    KERNELSPEC,
    MAX_CPU,
    MAX_KERNELS,
    MOUNT,
    SERVICE,
    Client,
    Site,
)
from tests.helpers.kube import bind_claim, no_leftovers
from tests.jupyter_server import execute_request

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

NOTEBOOK = {"type": "notebook", "kernel": {"name": KERNELSPEC}}


async def new_session(client: Client, path: str) -> str:
    """A notebook session of ``client`` on the Docker kernelspec; its kernel id."""
    status, model = await client.arequest("POST", "api/sessions", {"path": path, **NOTEBOOK})
    assert status == 201, (client, status, model)
    return str(model["kernel"]["id"])


async def cannot_attach(client: Client, kernel_id: str) -> str:
    """Try ``kernel_id``'s websocket as ``client``: refused (its status), or, where a
    gateway-mode server accepts the socket first, no reply to an execute_request."""
    session = uuid.uuid4().hex
    headers = {"Authorization": f"token {client.token}"}
    try:
        ws = await connect(client.ws_url(kernel_id, session), additional_headers=headers)
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"
    async with ws:
        msg = execute_request(session, "print(secret)")
        await ws.send(json.dumps(msg))
        seen = []
        try:
            async with asyncio.timeout(15):
                while True:
                    reply = json.loads(await ws.recv())
                    seen.append(reply.get("msg_type"))
                    assert "A-private-value" not in json.dumps(reply), (client, reply)
                    assert reply.get("parent_header", {}).get("msg_id") != msg["msg_id"], (
                        f"{client} ran code on {kernel_id}: {reply}"
                    )
        except (TimeoutError, ConnectionClosed):
            pass
    return f"accepted, then nothing answered ({seen})"


def kernels_of(client: Client) -> set[str]:
    status, listed = client.request("GET", "api/kernels")
    assert status == 200, (client, status, listed)
    return {k["id"] for k in listed}


def delete_all(site: Site) -> None:
    """The admin (our server's token) deletes every kernel it sees."""
    for kernel_id in kernels_of(site.admin):
        site.admin.request("DELETE", f"api/kernels/{kernel_id}")


def containers(docker_client: docker.DockerClient, kernel_id: str) -> list[dict[str, Any]]:
    flt = {"label": f"{LABEL_KERNEL_ID}={kernel_id}"}
    return docker_client.api.containers(all=True, filters=flt)


async def test_alices_kernel_is_hers_alone(site: Site, docker_client: docker.DockerClient) -> None:
    alice, bob = site.servers["alice"], site.servers["bob"]
    kid = await new_session(alice, "alice.ipynb")
    try:
        out = await alice.run(
            kid,
            "secret = 'A-private-value'\n"
            f"open('{MOUNT}/note.txt', 'w').write('from alice')\n"
            "import os; print(os.environ['KERNEL_USERNAME'])",
        )
        assert out["stdout"] == "alice\n", out
        assert (site.homes / "alice" / "note.txt").read_text() == "from alice"
        (container,) = containers(docker_client, kid)
        assert "alice" in json.dumps(container["Labels"]), container["Labels"]
        # The admin sees it; alice's server lists it.
        assert kid in kernels_of(site.admin) and kid in kernels_of(alice)

        # bob, through his own server and straight at ours with his own Hub token.
        for who in (bob, site.direct["bob"]):
            assert kid not in kernels_of(who), who
            status, sessions = await who.arequest("GET", "api/sessions")
            assert status == 200 and kid not in json.dumps(sessions), (who, sessions)
            nobodys = str(uuid.uuid4())
            for method, path in (
                ("GET", "api/kernels/{}"),
                ("POST", "api/kernels/{}/interrupt"),
                ("POST", "api/kernels/{}/restart"),
                ("DELETE", "api/kernels/{}"),
            ):
                body = {} if method == "POST" else None
                status, answer = await who.arequest(method, path.format(kid), body)
                # As for a kernel that does not exist: our server says 404; a single-user
                # server in gateway mode answers a restart of an unknown id with 500.
                unknown = await who.arequest(method, path.format(nobodys), body)
                assert status == unknown[0] and status in (404, 500), (
                    who,
                    method,
                    path,
                    status,
                    answer,
                    unknown,
                )
                if who.base == site.gateway.base:
                    assert status == 404, (who, method, path, status, answer)
            assert await cannot_attach(who, kid) == "refused 404", who
        # Jupyter Server's way to reconnect to a kernel is an access check, not a claim.
        direct = site.direct["bob"]
        status, answer = await direct.arequest("POST", "api/kernels", {"kernel_id": kid})
        assert status == 404, (status, answer)
        status, answer = await bob.arequest("POST", "api/kernels", {"kernel_id": kid})
        assert "A-private-value" not in json.dumps(answer)
        assert not (isinstance(answer, dict) and answer.get("execution_state")), answer
        # (Jupyter Server 2.x's gateway client then keeps the id in bob's server, a kernel
        # without a model; our server refuses its websocket, so nothing ever answers.)
        assert (await cannot_attach(bob, kid)).startswith(("refused", "accepted, then nothing"))
        assert kid not in kernels_of(site.direct["bob"])

        # alice's kernel is untouched: alive, her variable intact.
        assert (await alice.run(kid, "print(secret)"))["stdout"] == "A-private-value\n"
        assert containers(docker_client, kid), "bob's attempts removed alice's container"

        # bob's own kernel mounts his own directory, without alice's file.
        bob_kid = await new_session(bob, "bob.ipynb")
        out = await bob.run(
            bob_kid,
            f"import os; print(os.environ['KERNEL_USERNAME'], sorted(os.listdir('{MOUNT}')))",
        )
        assert out["stdout"] == "bob []\n", out
        assert kid not in kernels_of(bob) and bob_kid in kernels_of(bob)
        assert bob_kid not in kernels_of(alice)
        # ... and alice cannot reach bob's either, straight at our server.
        status, _ = await site.direct["alice"].arequest("DELETE", f"api/kernels/{bob_kid}")
        assert status == 404
    finally:
        delete_all(site)
    assert not containers(docker_client, kid), "alice's container outlived its deletion"


async def test_quotas_and_parameters_are_refused_with_their_messages(
    site: Site, docker_client: docker.DockerClient
) -> None:
    alice = site.servers["alice"]
    try:
        kernels = [await new_session(alice, f"quota-{i}.ipynb") for i in range(MAX_KERNELS)]
        out = await alice.run(kernels[-1], "print(2 + 3)")
        assert out["stdout"] == "5\n", out
        # The third, through her own server: the refusal and its message reach her.
        status, answer = await alice.arequest(
            "POST", "api/sessions", {"path": "quota-x.ipynb", **NOTEBOOK}
        )
        # Jupyter Server's sessions handler wraps any start error in a 500, with the
        # gateway's status and message in its own.
        message = json.dumps(answer)
        assert status == 500 and "HTTP 429" in message, (status, answer)
        assert "Kernel limit reached" in message and f"is {MAX_KERNELS}" in message, answer
        # Its kernels handler keeps the status; its message is the gateway client's
        # unformatted template (Jupyter Server 2.x writes an HTTPError's log_message
        # without its args), so the count is not in it.
        status, answer = await alice.arequest("POST", "api/kernels", {"name": KERNELSPEC})
        assert status == 429, (status, answer)
        # Straight at our server, the same.
        direct = site.direct["alice"]
        status, answer = await direct.arequest("POST", "api/kernels", {"name": KERNELSPEC})
        assert status == 429 and f"is {MAX_KERNELS}" in answer["message"], (status, answer)
        assert kernels_of(site.admin) == set(kernels)

        # A bad launch parameter (bob is under his quota): 400 naming it, nothing started.
        bob = site.direct["bob"]
        for body in (
            {"name": KERNELSPEC, "parameters": {"cpu": 64}},
            {"name": KERNELSPEC, "env": {"KERNEL_CPU": "64"}},
            {"name": KERNELSPEC, "parameters": {"gpus": 1}},
        ):
            status, answer = await bob.arequest("POST", "api/kernels", body)
            assert status == 400, (body, status, answer)
            named = "gpus" if "gpus" in json.dumps(body) else "cpu"
            assert named in answer["message"], (body, answer)
        assert kernels_of(site.admin) == set(kernels)
        # A good one starts, and answers, its container limited to what it asked for.
        status, model = await bob.arequest(
            "POST", "api/kernels", {"name": KERNELSPEC, "parameters": {"cpu": 1.5}}
        )
        assert status == 201, (status, model)
        out = await bob.run(model["id"], "import os; print(os.environ['KERNEL_USERNAME'])")
        assert out["stdout"] == "bob\n", out
        (container,) = containers(docker_client, model["id"])
        nano_cpus = docker_client.api.inspect_container(container["Id"])["HostConfig"]["NanoCpus"]
        assert nano_cpus == 1_500_000_000
        # One more at the default cpu (1) would pass his CPU cap: 403 saying the cap.
        status, answer = await bob.arequest("POST", "api/kernels", {"name": KERNELSPEC})
        assert status == 403, (status, answer)
        assert "CPU cap exceeded" in answer["message"], answer
        assert f"cap of {MAX_CPU:g} CPU" in answer["message"], answer
        assert kernels_of(site.admin) == {*kernels, model["id"]}
    finally:
        delete_all(site)


async def test_a_token_without_the_services_scope_is_refused(site: Site) -> None:
    """bob's Hub token that may only read his name: a valid Hub token, not for us."""
    token = site.hub.token("bob", ["read:users:name!user=bob"], note="no service scope")
    client = Client("bob", site.gateway.base, token)
    status, answer = await client.arequest("GET", "api/kernels")
    assert status == 403, (status, answer)
    status, answer = await client.arequest("POST", "api/kernels", {"name": KERNELSPEC})
    assert status == 403, (status, answer)
    assert kernels_of(site.admin) == set()
    # The same user with the scope is served; an unknown token is not.
    assert kernels_of(site.direct["bob"]) == set()
    status, _ = await Client("x", site.gateway.base, uuid.uuid4().hex).arequest(
        "GET", "api/kernels"
    )
    assert status == 403
    # Each single-user server sends its own server token, from its environment, never
    # from its command line, and no two users share one.
    assert site.hub.proc is not None
    tokens_sent = {}
    for proc in psutil.Process(site.hub.proc.pid).children(recursive=True):
        cmdline = proc.cmdline()
        if "jupyterhub.singleuser" not in cmdline:
            continue
        env = proc.environ()
        sent = env["JUPYTER_GATEWAY_AUTH_TOKEN"]
        assert sent == env["JUPYTERHUB_API_TOKEN"] and sent not in " ".join(cmdline)
        tokens_sent[env["JUPYTERHUB_USER"]] = sent
    assert sorted(tokens_sent) == ["alice", "bob"] and len(set(tokens_sent.values())) == 2
    for user, sent in tokens_sent.items():
        status, me = await Client(user, site.gateway.base, sent).arequest("GET", "api/me")
        assert status == 200 and me["identity"]["username"] == user, (status, me)
    # The Hub does give single-user servers the scope (c.Spawner.server_token_scopes).
    status, tokens = site.hub.api("GET", "users/bob/tokens")
    assert status == 200
    server_tokens = [t for t in tokens["api_tokens"] if t["note"].startswith("Server at")]
    assert server_tokens and all(
        f"access:services!service={SERVICE}" in t["scopes"] for t in server_tokens
    ), server_tokens


async def test_a_kernelspec_for_a_hub_group(site: Site) -> None:
    """Group membership comes from the Hub: alice (in team-a) sees and may start the
    group's kernelspec; for bob it does not exist, through his server or straight."""
    for who in (site.servers["alice"], site.direct["alice"]):
        status, specs = await who.arequest("GET", "api/kernelspecs")
        assert status == 200 and GROUP_KERNELSPEC in specs["kernelspecs"], (who, specs)
    for who in (site.servers["bob"], site.direct["bob"]):
        status, specs = await who.arequest("GET", "api/kernelspecs")
        assert status == 200, (who, specs)
        assert GROUP_KERNELSPEC not in specs["kernelspecs"] and KERNELSPEC in specs["kernelspecs"]
    status, answer = await site.direct["bob"].arequest(
        "POST", "api/kernels", {"name": GROUP_KERNELSPEC}
    )
    assert status == 404, (status, answer)
    try:
        status, model = await site.direct["alice"].arequest(
            "POST", "api/kernels", {"name": GROUP_KERNELSPEC}
        )
        assert status == 201, (status, model)
        out = await site.direct["alice"].run(model["id"], "print('team-a')")
        assert out["stdout"] == "team-a\n", out
    finally:
        delete_all(site)


async def delete_claim(kube: Kube, api: KubeClient, claim: str) -> None:
    with contextlib.suppress(NotFound):
        await api.request("DELETE", resource_path("persistentvolumeclaims", kube.namespace, claim))
    if kube.forbid is None:
        with contextlib.suppress(NotFound):
            await api.request("DELETE", f"/api/v1/persistentvolumes/pv-hub-{claim}")


@pytest.mark.k8s
async def test_alices_kubernetes_kernel_and_claim_are_hers_alone(
    site: Site, kube: Kube, kube_client: KubeClient, tmp_path: Path
) -> None:
    alice, bob = site.servers["alice"], site.servers["bob"]
    claims = {user: f"claim-{user}" for user in ("alice", "bob")}
    for claim in claims.values():
        await delete_claim(kube, kube_client, claim)  # a run killed before its cleanup
        await bind_claim(kube, kube_client, claim, tmp_path, prefix="pv-hub", label="hub")
    config = kube.config(user_volume_mount_path=MOUNT, working_dir=MOUNT, fs_group=1000)
    name = "k8s-user"
    write_kernelspec(
        site.gateway.kernels, name, "cluster-kubernetes-provisioner", config, argv=CONTAINER_ARGV
    )
    notebook = {"type": "notebook", "kernel": {"name": name}}
    started: list[str] = []
    try:
        body = {"path": "k.ipynb", **notebook}
        status, model = await alice.arequest("POST", "api/sessions", body)
        assert status == 201, (status, model)
        kid = model["kernel"]["id"]
        started.append(kid)
        out = await alice.run(
            kid,
            "secret = 'A-private-value'; open('note.txt', 'w').write('from alice')\n"
            "import os; print(os.environ['KERNEL_USERNAME'], os.getcwd())",
        )
        assert out["stdout"] == f"alice {MOUNT}\n", out
        path = resource_path("persistentvolumeclaims", kube.namespace, claims["alice"])
        claim = await kube_client.request("GET", path)
        assert claim["metadata"]["annotations"][m.ANNOTATION_USERNAME] == "alice"

        for who in (bob, site.direct["bob"]):
            status, listed = await who.arequest("GET", "api/kernels")
            assert status == 200 and kid not in json.dumps(listed), (who, listed)
            status, answer = await who.arequest("DELETE", f"api/kernels/{kid}")
            assert status == 404, (who, status, answer)
            status, answer = await who.arequest("POST", f"api/kernels/{kid}/interrupt", {})
            assert status == 404, (who, status, answer)
            assert await cannot_attach(who, kid) == "refused 404", who

        # bob's own Kubernetes kernel has his own claim, without alice's file.
        status, model = await bob.arequest("POST", "api/sessions", body)
        assert status == 201, (status, model)
        started.append(model["kernel"]["id"])
        out = await bob.run(started[-1], "import os; print(sorted(os.listdir('.')))")
        assert out["stdout"] == "[]\n", out
        assert (await alice.run(kid, "print(secret)"))["stdout"] == "A-private-value\n"
    finally:
        for kernel_id in started:
            await site.admin.arequest("DELETE", f"api/kernels/{kernel_id}")
        for kernel_id in started:
            await no_leftovers(kube_client, kube.namespace, kernel_id)
        for claim in claims.values():
            await delete_claim(kube, kube_client, claim)
        (site.gateway.kernels / name / "kernel.json").unlink()

"""Many users on one server (issue 22): a real Jupyter Server with ``provisioners.access``.

Users come from a token file; the server's token is an admin. A user's kernel and session
are invisible to another user: every request naming them (REST or websocket) answers 404
as for a kernel that does not exist, and lists leave them out. The lists are the access
extension's own handlers: were Jupyter Server's routed first, bob would list alice's
kernel and these tests would fail.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.helpers import LOCAL_PROVISIONER, write_kernelspec

pytestmark = pytest.mark.timeout(240)


def _session(kernel: dict[str, Any], path: str = "work.ipynb") -> dict[str, Any]:
    return {"path": path, "type": "notebook", "name": path, "kernel": kernel}


async def test_a_user_sees_and_uses_only_their_own_kernels(access_server: Any) -> None:
    server = access_server(access={"admin_groups": ["ops"]})
    write_kernelspec(server.kernels, "local", LOCAL_PROVISIONER)
    with server:
        alice, bob, admin = server.clients["alice"], server.clients["bob"], server.admin
        status, session = alice.request("POST", "api/sessions", _session({"name": "local"}))
        assert status == 201, session
        kernel_id, session_id = session["kernel"]["id"], session["id"]
        out = await alice.run(kernel_id, "secret = 'A-private-value'")
        assert out["status"] == "ok", out

        # bob: nothing of alice's is visible, everything of hers answers 404
        assert bob.request("GET", "api/kernels") == (200, [])
        assert bob.request("GET", "api/sessions") == (200, [])
        missing = str(uuid.uuid4())
        status, unknown = bob.request("GET", f"api/kernels/{missing}")
        assert status == 404
        status, reply = bob.request("GET", f"api/kernels/{kernel_id}")
        assert status == 404
        assert reply["message"] == unknown["message"].replace(missing, kernel_id)
        for method, path in [
            ("DELETE", f"api/kernels/{kernel_id}"),
            ("POST", f"api/kernels/{kernel_id}/interrupt"),
            ("POST", f"api/kernels/{kernel_id}/restart"),
            ("GET", f"api/sessions/{session_id}"),
            ("PATCH", f"api/sessions/{session_id}"),
            ("DELETE", f"api/sessions/{session_id}"),
        ]:
            status, reply = bob.request(method, path, {} if method != "GET" else None)
            assert status == 404, (method, path, reply)
        assert await bob.ws_status(kernel_id) == 404
        assert await bob.ws_status(kernel_id, query_token=True) == 404
        # Jupyter Server's reconnection request: an access check, never a claim
        status, reply = bob.request("POST", "api/kernels", {"kernel_id": kernel_id})
        assert status == 404, reply
        status, reply = bob.request("POST", "api/kernels", {"kernel_id": missing})
        assert status == 404, reply
        status, reply = bob.request("POST", "api/sessions", _session({"id": kernel_id}, "b"))
        assert status == 404, reply
        # the same path is bob's own session with a kernel of his own
        status, bobs = bob.request("POST", "api/sessions", _session({"name": "local"}))
        assert status == 201, bobs
        assert bobs["id"] != session_id and bobs["kernel"]["id"] != kernel_id
        # a session of bob's cannot be switched to alice's kernel; to a new kernel it can,
        # started as bob's (the old one shut down)
        patch = {"kernel": {"id": kernel_id}}
        assert bob.request("PATCH", f"api/sessions/{bobs['id']}", patch)[0] == 404
        status, patched = bob.request(
            "PATCH", f"api/sessions/{bobs['id']}", {"kernel": {"name": "local"}}
        )
        assert status == 200, patched
        assert patched["kernel"]["id"] not in (kernel_id, bobs["kernel"]["id"])
        bobs = patched
        assert [k["id"] for k in bob.request("GET", "api/kernels")[1]] == [bobs["kernel"]["id"]]
        assert alice.request("GET", f"api/kernels/{bobs['kernel']['id']}")[0] == 404
        # no server shutdown, no contents, no terminals for a user
        assert bob.request("POST", "api/shutdown")[0] == 403
        assert bob.request("GET", "api/contents")[0] == 403
        assert bob.request("POST", "api/terminals")[0] in (403, 404)
        status, me = bob.request("GET", "api/me")
        assert status == 200
        assert (me["identity"]["username"], me["identity"]["groups"]) == ("bob", ["team-b"])
        assert me["identity"]["admin"] is False
        status, counts = bob.request("GET", "api/status")  # his own kernel, not alice's
        assert (status, counts["kernels"]) == (200, 1), counts
        assert alice.request("GET", "api/status")[1]["kernels"] == 1
        assert admin.request("GET", "api/status")[1]["kernels"] == 2
        # an unknown token is nobody
        stranger = type(bob)(server.server, "not-a-token-" + uuid.uuid4().hex, "x")
        assert stranger.request("GET", "api/kernels")[0] == 403

        # alice's reconnection gets her kernel, still hers
        status, reply = alice.request("POST", "api/kernels", {"kernel_id": kernel_id})
        assert (status, reply["id"]) == (201, kernel_id)
        assert [k["id"] for k in alice.request("GET", "api/kernels")[1]] == [kernel_id]
        assert [s["id"] for s in alice.request("GET", "api/sessions")[1]] == [session_id]
        assert bob.request("GET", f"api/kernels/{kernel_id}")[0] == 404

        # admins see and reach everything: the server's token, and a member of an admin group
        for who in (admin, server.clients["ops-olga"]):
            listed = {k["id"] for k in who.request("GET", "api/kernels")[1]}
            assert listed == {kernel_id, bobs["kernel"]["id"]}, who.name
            sessions = {s["id"] for s in who.request("GET", "api/sessions")[1]}
            assert sessions == {session_id, bobs["id"]}, who.name
            assert who.request("GET", f"api/kernels/{kernel_id}")[0] == 200
        assert server.admin.request("GET", "api/contents")[0] == 200

        # alice's kernel answers after all of it, her variable intact, over a websocket
        # authenticated by header and by ?token=
        out = await alice.run(kernel_id, "print(secret)")
        assert (out["status"], out["stdout"]) == ("ok", "A-private-value\n"), out
        out = await alice.run(kernel_id, "print(len(secret))", query_token=True)
        assert out["stdout"] == "15\n", out
        assert bob.request("DELETE", f"api/sessions/{bobs['id']}")[0] == 204
        assert alice.request("DELETE", f"api/kernels/{kernel_id}")[0] == 204
        assert admin.request("GET", "api/kernels") == (200, [])
    log = server.log()
    for token in server.tokens.values():
        assert token not in log, "a token was logged"

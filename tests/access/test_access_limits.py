"""Kernelspec groups, launch parameters and per-user quotas through a real Jupyter Server
with ``provisioners.access``, each refusal with its status and a message that says why.

The kernelspecs here use jupyter_client's own ``local-provisioner``: the owner of such a
kernel is the access extension's record (a cluster provisioner's is its ``username``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.helpers import LOCAL_PROVISIONER, write_kernelspec

pytestmark = pytest.mark.timeout(240)

#: jupyter_client's own provisioner (not a cluster provisioner)
JUPYTER_CLIENT_LOCAL = "local-provisioner"
PARAMETERS = {
    "cpu": {"type": "number", "minimum": 0.5, "maximum": 4, "default": 1},
    "memory": {"type": "string", "maximum": "8Gi", "default": "1Gi"},
}


def _start(client: Any, name: str, **body: Any) -> tuple[int, Any]:
    return client.request("POST", "api/kernels", {"name": name, **body})


def test_quotas_parameters_and_kernelspec_groups(access_server: Any) -> None:
    server = access_server(
        access={"max_kernels_per_user": 2, "max_cpu_per_user": 2, "max_memory_per_user": "3Gi"}
    )
    sized = {"parameters": PARAMETERS}
    write_kernelspec(server.kernels, "sized", JUPYTER_CLIENT_LOCAL, metadata=sized)
    team_b = {"allowed_groups": ["team-b"]}
    write_kernelspec(server.kernels, "team-b-only", LOCAL_PROVISIONER, metadata=team_b)
    with server:
        alice, bob, admin = server.clients["alice"], server.clients["bob"], server.admin

        # a kernelspec of another group: hidden, and refused as an unknown one
        status, specs = alice.request("GET", "api/kernelspecs")
        assert status == 200 and "sized" in specs["kernelspecs"], specs
        assert "team-b-only" not in specs["kernelspecs"]
        assert "team-b-only" in bob.request("GET", "api/kernelspecs")[1]["kernelspecs"]
        assert alice.request("GET", "api/kernelspecs/team-b-only")[0] == 404
        assert alice.request("GET", "kernelspecs/team-b-only/kernel.json")[0] == 404
        assert bob.request("GET", "api/kernelspecs/team-b-only")[0] == 200
        refused = _start(alice, "team-b-only")
        unknown = _start(alice, "no-such-spec")
        assert refused[0] == unknown[0] == 404, (refused, unknown)
        assert refused[1]["message"] == unknown[1]["message"].replace("no-such-spec", "team-b-only")
        session = {"path": "b.ipynb", "type": "notebook", "kernel": {"name": "team-b-only"}}
        assert alice.request("POST", "api/sessions", session)[0] == 404
        assert alice.request("GET", "api/kernels") == (200, [])

        # launch parameters: a bad value is a 400 naming the parameter, nothing started
        status, reply = _start(alice, "sized", parameters={"cpu": 9})
        assert status == 400 and "'cpu'" in reply["message"], reply
        status, reply = _start(alice, "sized", parameters={"colour": "red"})
        assert status == 400 and "'colour'" in reply["message"], reply
        status, reply = _start(alice, "sized", env={"KERNEL_MEMORY": "lots"})
        assert status == 400 and "'memory'" in reply["message"], reply
        status, reply = _start(alice, "sized", env={"KERNEL_CPU": 2})
        assert status == 400 and "'KERNEL_CPU' must be a string" in reply["message"], reply
        assert alice.request("POST", "api/kernels", {"name": ["sized"]})[0] == 400
        assert alice.request("GET", "api/kernels") == (200, [])

        # quotas on the sum of alice's kernels' resolved cpu and memory, and their count
        status, first = _start(alice, "sized", parameters={"cpu": 1.5})
        assert status == 201, first
        status, reply = _start(alice, "sized", parameters={"cpu": 1})
        assert status == 403, reply
        assert "1.5 CPU" in reply["message"] and "cap of 2 CPU" in reply["message"], reply
        status, reply = _start(alice, "sized", parameters={"cpu": 0.5, "memory": "4Gi"})
        assert status == 403, reply
        assert "1Gi" in reply["message"] and "cap of 3Gi" in reply["message"], reply
        status, second = _start(alice, "sized", env={"KERNEL_CPU": "0.5"})
        assert status == 201, second
        status, reply = _start(alice, "sized", parameters={"cpu": 0.5})
        assert status == 429, reply
        assert "has 2 kernel(s)" in reply["message"] and "is 2" in reply["message"], reply
        # per user: bob starts his own; admins have no quota
        assert _start(bob, "sized", parameters={"cpu": 2})[0] == 201
        assert _start(admin, "sized", parameters={"cpu": 4})[0] == 201
        assert _start(admin, "sized", parameters={"cpu": 4})[0] == 201
        # a kernel gone frees its share
        assert alice.request("DELETE", f"api/kernels/{first['id']}")[0] == 204
        status, third = _start(alice, "sized", parameters={"cpu": 1.5})
        assert status == 201, third
        mine = {k["id"] for k in alice.request("GET", "api/kernels")[1]}
        assert mine == {second["id"], third["id"]}
        assert bob.request("GET", f"api/kernels/{third['id']}")[0] == 404
        assert len(admin.request("GET", "api/kernels")[1]) == 5
        for kernel in admin.request("GET", "api/kernels")[1]:
            assert admin.request("DELETE", f"api/kernels/{kernel['id']}")[0] == 204

        # starts at once count while they start: of three, two start and one gets 429
        with ThreadPoolExecutor(3) as pool:
            starts = [pool.submit(_start, alice, "sized", parameters={"cpu": 0.5}) for _ in "abc"]
            statuses = sorted(f.result()[0] for f in starts)
        assert statuses == [201, 201, 429], [f.result() for f in starts]
        assert len(alice.request("GET", "api/kernels")[1]) == 2

"""AccessIdentityProvider: JupyterHub tokens (scope check, groups, cache, a Hub that is
down) against a tiny tornado app serving the Hub's two API paths, in-process and through a
real Jupyter Server; the token file read again when it changes. The real JupyterHub is
tests/multiuser's."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from traitlets.config import Config

from provisioners.access import AccessIdentityProvider, AccessUser, KernelAccess
from tests.helpers import LOCAL_PROVISIONER, write_kernelspec
from tests.jupyter_server import free_port

SERVICE_TOKEN = "service-token-0123456789"
SERVER_TOKEN = "server-token-0123456789"
GATEWAY = "access:services!service=gateway"
HUB_USERS = {
    # a single-user server's token: the gateway scope, no groups in its own model
    "alice-hub-token-123": {"kind": "user", "name": "alice", "scopes": [GATEWAY]},
    "carol-hub-token-123": {
        "kind": "user",
        "name": "carol",
        "scopes": ["access:services"],
        "groups": ["ops"],
    },
    "root-hub-token-1234": {"kind": "user", "name": "root", "admin": True, "scopes": [GATEWAY]},
    "other-service-token": {
        "kind": "user",
        "name": "eve",
        "scopes": ["access:services!service=other", "access:servers!user=eve"],
    },
    "a-service-token-123": {"kind": "service", "name": "cull", "scopes": ["access:services"]},
}
HUB_GROUPS = {"alice": ["team-a"], "carol": ["ops"], "root": [], "eve": []}


class FakeHub:
    """JupyterHub's ``/hub/api/user`` and ``/hub/api/users/<name>``; counts requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.delay = 0.0
        hub = self

        class User(web.RequestHandler):
            async def get(self) -> None:
                hub.requests.append("/user")
                await asyncio.sleep(hub.delay)
                token = self.request.headers.get("Authorization", "").partition(" ")[2]
                if token not in HUB_USERS:
                    raise web.HTTPError(403)
                self.finish(json.dumps(HUB_USERS[token]))

        class Users(web.RequestHandler):
            def get(self, name: str) -> None:
                hub.requests.append(f"/users/{name}")
                if self.request.headers.get("Authorization") != f"token {SERVICE_TOKEN}":
                    raise web.HTTPError(403)
                self.finish(json.dumps({"name": name, "groups": HUB_GROUPS[name]}))

        self.app = web.Application([("/hub/api/user", User), ("/hub/api/users/([^/]+)", Users)])
        self.port = free_port()
        self.server: HTTPServer | None = None

    def start(self) -> None:
        self.server = self.app.listen(self.port, "127.0.0.1")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()
            self.server = None


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    fake = FakeHub()
    fake.start()
    yield fake
    await fake.stop()


def _provider(**access: Any) -> AccessIdentityProvider:
    KernelAccess.clear_instance()
    config = Config({"KernelAccess": access})
    KernelAccess.instance(config=config)
    return AccessIdentityProvider(config=config, token=SERVER_TOKEN)


@pytest.fixture(autouse=True)
def fresh_access(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    KernelAccess.clear_instance()
    logged = caplog.text
    tokens = [*HUB_USERS, SERVICE_TOKEN, SERVER_TOKEN, "alice-file-token", "bob-file-token"]
    assert [t for t in tokens if t in logged] == [], "a token was logged"


def _hub_provider(hub: FakeHub, **extra: Any) -> AccessIdentityProvider:
    settings = {
        "hub_api_url": f"http://127.0.0.1:{hub.port}/hub/api",
        "hub_service_name": "gateway",
        "hub_api_token": SERVICE_TOKEN,
        "cache_ttl": 0.6,
        "negative_cache_ttl": 0.6,
        "admin_groups": ["ops"],
    }
    return _provider(**{**settings, **extra})


async def test_a_hub_token_with_the_gateway_scope_is_its_user(hub: FakeHub) -> None:
    provider = _hub_provider(hub)
    alice = await provider.user_for_token("alice-hub-token-123")
    assert alice == AccessUser(username="alice", groups=["team-a"], admin=False)
    # groups came from the service's own read of the user, once
    assert hub.requests == ["/user", "/users/alice"]
    assert await provider.user_for_token("alice-hub-token-123") == alice
    assert hub.requests == ["/user", "/users/alice"], "not cached"
    await asyncio.sleep(0.7)  # cache_ttl passed: asked again
    assert await provider.user_for_token("alice-hub-token-123") == alice
    assert hub.requests == ["/user", "/users/alice"] * 2

    carol = await provider.user_for_token("carol-hub-token-123")  # access:services, in ops
    assert (carol.username, carol.groups, carol.admin) == ("carol", ["ops"], True)
    root = await provider.user_for_token("root-hub-token-1234")  # a Hub admin
    assert (root.username, root.admin) == ("root", True)


async def test_concurrent_requests_with_one_token_ask_the_hub_once(hub: FakeHub) -> None:
    provider = _hub_provider(hub)
    hub.delay = 0.3
    users = await asyncio.gather(
        *(provider.user_for_token("alice-hub-token-123") for _ in range(8))
    )
    assert {u.username for u in users if u} == {"alice"} and all(users)
    assert hub.requests.count("/user") == 1


async def test_a_token_without_the_scope_or_of_a_service_is_refused_and_remembered(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    provider = _hub_provider(hub)
    assert await provider.user_for_token("other-service-token") is None
    assert "lacks the scope access:services!service=gateway" in caplog.text
    assert await provider.user_for_token("a-service-token-123") is None
    assert await provider.user_for_token("nobody-knows-this-token") is None
    assert hub.requests == ["/user"] * 3
    for token in ("other-service-token", "a-service-token-123", "nobody-knows-this-token"):
        assert await provider.user_for_token(token) is None
    assert hub.requests == ["/user"] * 3, "refusals are cached for negative_cache_ttl"
    await asyncio.sleep(0.7)
    assert await provider.user_for_token("nobody-knows-this-token") is None
    assert hub.requests == ["/user"] * 4


async def test_without_the_service_token_groups_are_empty(hub: FakeHub) -> None:
    provider = _hub_provider(hub, hub_api_token="")
    alice = await provider.user_for_token("alice-hub-token-123")
    assert alice is not None and alice.groups == []
    assert hub.requests == ["/user"]


async def test_a_hub_that_is_down_answers_503_never_an_admin(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    provider = _hub_provider(hub, hub_request_timeout=2)
    await hub.stop()
    with pytest.raises(web.HTTPError) as raised:
        await provider.user_for_token("alice-hub-token-123")
    assert raised.value.status_code == 503
    assert "JupyterHub API" in caplog.text and "unreachable" in caplog.text.lower()
    # not cached: the Hub back, the token works
    hub.start()
    alice = await provider.user_for_token("alice-hub-token-123")
    assert alice is not None and alice.username == "alice"
    # the server's own token never needs the Hub
    await hub.stop()
    admin = await provider.user_for_token(SERVER_TOKEN)
    assert admin == AccessUser(username="admin", admin=True)


class _Request:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = HTTPHeaders(headers)
        self.remote_ip = "127.0.0.1"
        self.path = "/api/kernels"


class _Handler:
    """What the identity provider reads of a request handler."""

    def __init__(self, headers: dict[str, str], query: dict[str, str] | None = None) -> None:
        self.request = _Request(headers)
        self.query = query or {}

    def get_argument(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)


async def test_the_token_file_maps_tokens_to_users_and_is_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users.json"
    path.write_text(
        json.dumps(
            {
                "alice-file-token": {"name": "alice", "groups": ["team-a"]},
                "short": {"name": "mallory"},
                "bob-file-token": {"name": "", "groups": []},
            }
        )
    )
    provider = _provider(token_file=str(path), admin_users=["bob"])
    for handler in (
        _Handler({"Authorization": "token alice-file-token"}),
        _Handler({"Authorization": "Bearer alice-file-token"}),
        _Handler({}, {"token": "alice-file-token"}),
    ):
        user = await provider.get_user(handler)  # type: ignore[arg-type]
        assert user == AccessUser(username="alice", groups=["team-a"])
        assert handler._token_authenticated is True  # type: ignore[attr-defined]
    assert await provider.get_user(_Handler({"Authorization": "token short"})) is None  # type: ignore[arg-type]
    assert "shorter than 8 characters" in caplog.text
    assert "'name' must be a non-empty string" in caplog.text
    assert await provider.user_for_token("bob-file-token") is None
    admin = await provider.get_user(_Handler({"Authorization": f"token {SERVER_TOKEN}"}))  # type: ignore[arg-type]
    assert admin is not None and admin.admin

    # a user named as the server token's admin would own the admin's kernels: refused
    path.write_text(json.dumps({"bob-file-token": {"name": "admin"}}))
    os.utime(path, ns=(3, 3))
    assert await provider.user_for_token("bob-file-token") is None
    assert "the name of the server token's admin" in caplog.text

    # changed: bob added (an admin by admin_users), alice removed
    path.write_text(json.dumps({"bob-file-token": {"name": "bob", "groups": ["team-b"]}}))
    os.utime(path, ns=(1, 1))  # a new mtime even within the clock's resolution
    bob = await provider.user_for_token("bob-file-token")
    assert bob == AccessUser(username="bob", groups=["team-b"], admin=True)
    assert await provider.user_for_token("alice-file-token") is None
    # half-written: the users read last stay
    path.write_text('{"bob-file-token": ')
    os.utime(path, ns=(2, 2))
    assert (await provider.user_for_token("bob-file-token")) == bob
    assert "is not valid JSON" in caplog.text


async def test_a_server_in_hub_mode_serves_hub_users_and_answers_503_without_the_hub(
    hub: FakeHub, access_server: Any
) -> None:
    server = access_server(
        access={
            "hub_api_url": f"http://127.0.0.1:{hub.port}/hub/api",
            "hub_service_name": "gateway",
            "hub_api_token": SERVICE_TOKEN,
        }
    )
    write_kernelspec(server.kernels, "local", LOCAL_PROVISIONER)
    await asyncio.to_thread(server.__enter__)
    try:
        admin = server.admin
        alice = type(admin)(server.server, "alice-hub-token-123", "alice")
        eve = type(admin)(server.server, "other-service-token", "eve")
        carol = type(admin)(server.server, "carol-hub-token-123", "carol")
        status, me = await asyncio.to_thread(alice.request, "GET", "api/me")
        assert status == 200, me
        assert (me["identity"]["username"], me["identity"]["groups"]) == ("alice", ["team-a"])
        status, model = await asyncio.to_thread(
            alice.request, "POST", "api/kernels", {"name": "local", "env": {"KERNEL_USERNAME": "x"}}
        )
        assert status == 201, model
        out = await alice.run(model["id"], "import os; print(os.environ['KERNEL_USERNAME'])")
        assert out["stdout"] == "alice\n", out
        assert (await asyncio.to_thread(eve.request, "GET", "api/kernels"))[0] == 403
        # the token file's bob still works beside the Hub
        bob = server.clients["bob"]
        assert await asyncio.to_thread(bob.request, "GET", "api/kernels") == (200, [])

        await hub.stop()
        status, reply = await asyncio.to_thread(carol.request, "GET", "api/kernels")
        assert status == 503, reply
        assert "Cannot authenticate through JupyterHub" in reply["message"], reply
        assert (await asyncio.to_thread(admin.request, "GET", "api/kernels"))[0] == 200
        status, _ = await asyncio.to_thread(admin.request, "DELETE", f"api/kernels/{model['id']}")
        assert status == 204
    finally:
        await asyncio.to_thread(server.__exit__, None, None, None)
    log = server.log()
    assert "unreachable" in log or "unavailable" in log, log
    assert [t for t in HUB_USERS if t in log] == []

"""Fixtures of the access suite: a real Jupyter Server with the ``provisioners.access``
extension, users from a token file, and a client per token (REST and websocket)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jupyter_server import JupyterServer, http, ws_execute

#: The users of the token file: alice in team-a, bob in team-b, ops-olga an admin by group.
USERS = {
    "alice": {"groups": ["team-a"]},
    "bob": {"groups": ["team-b"]},
    "ops-olga": {"groups": ["ops"]},
}


class Client:
    """One user's requests to the server: REST with its token, and kernel websockets."""

    def __init__(self, server: JupyterServer, token: str, name: str) -> None:
        self.server = server
        self.token = token
        self.name = name

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``(status, JSON body or text)``."""
        status, data = http(method, self.server.base + path, self.token, body)
        text = data.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def ws_url(self, kernel_id: str, *, query_token: bool = False) -> str:
        url = self.server.ws_url(kernel_id, uuid.uuid4().hex)
        return f"{url}&token={self.token}" if query_token else url

    def ws_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def ws_status(self, kernel_id: str, *, query_token: bool = False) -> int:
        """The HTTP status a websocket to ``kernel_id`` gets (101 when it connects)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        headers = {} if query_token else self.ws_headers()
        url = self.ws_url(kernel_id, query_token=query_token)
        try:
            async with connect(url, additional_headers=headers, open_timeout=30):
                return 101
        except InvalidStatus as exc:
            return int(exc.response.status_code)

    async def run(self, kernel_id: str, code: str, *, query_token: bool = False) -> dict:
        """Run ``code`` on ``kernel_id`` over a websocket of this user's."""
        from websockets.asyncio.client import connect

        session = uuid.uuid4().hex
        url = self.server.ws_url(kernel_id, session)
        if query_token:
            url += f"&token={self.token}"
        headers = {} if query_token else self.ws_headers()
        async with connect(url, additional_headers=headers, open_timeout=30) as ws:
            return await ws_execute(ws, session, code)


class AccessServer:
    """A Jupyter Server with the access extension; ``clients[name]`` per user and
    ``admin`` (the server's token)."""

    def __init__(self, root: Path, access: dict[str, Any], config: dict[str, Any]) -> None:
        self.root = root
        self.tokens = {name: f"{name}-{uuid.uuid4().hex}" for name in USERS}
        self.token_file = root / "users.json"
        self.write_users()
        settings: dict[str, Any] = {
            "ServerApp": {"jpserver_extensions": {"provisioners.access": True}},
            "KernelAccess": {"token_file": str(self.token_file), **access},
            **config,
        }
        config_dir = root / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "jupyter_server_config.json").write_text(json.dumps(settings))
        self.server = JupyterServer(root, env={"JUPYTER_CONFIG_DIR": str(config_dir)})
        self.kernels = self.server.kernels
        self.admin = Client(self.server, self.server.token, "admin")
        self.clients = {name: Client(self.server, t, name) for name, t in self.tokens.items()}

    def write_users(self, **extra: dict[str, Any]) -> None:
        users = {self.tokens[n]: {"name": n, **USERS[n]} for n in USERS}
        users.update(extra)
        self.token_file.write_text(json.dumps(users))

    def __enter__(self) -> AccessServer:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def log(self) -> str:
        return self.server.log()


@pytest.fixture
def access_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``access_server(access={...KernelAccess...}, config={...})``, not started
    (write kernelspecs into ``.kernels`` first, then ``with server:``)."""

    def make(access: dict[str, Any] | None = None, config: dict[str, Any] | None = None):
        return AccessServer(tmp_path, access or {}, config or {})

    yield make

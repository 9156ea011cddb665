"""A real JupyterHub for tests: PyPI ``jupyterhub`` with npm's configurable-http-proxy.

``Hub(root, gateway_url)`` runs JupyterHub 6 as a subprocess on 127.0.0.1 free ports: the
dummy authenticator (users ``alice`` and ``bob``, one password), the simple local-process
spawner, a group ``team-a`` (alice), and two services:

- ``gateway``, our server: an ``api_token`` and a role granting ``read:users`` (what the
  access layer needs to resolve a user's token and read their groups);
- ``tester``, the test's driver: the ``admin`` role, to start servers and issue tokens.

Each user's single-user server runs in gateway mode against ``gateway_url``, sending its
own Hub API token as ``GatewayClient.auth_token``. The token reaches it through
``Spawner.environment`` (a callable returning ``spawner.api_token`` into
``JUPYTER_GATEWAY_AUTH_TOKEN``), never on a command line. ``c.Spawner.server_token_scopes``
is the Hub's default ``server`` role plus ``access:services!service=gateway``, and every
user holds that scope (the ``user`` role): a server token gets only the requested scopes
its user holds.

Nothing here imports ``provisioners``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import CONTAINER_ARGV, KERNEL_TEST_IMAGE, engine_required, write_kernelspec
from tests.jupyter_server import JupyterServer, free_port

SERVICE = "gateway"
USERS = ("alice", "bob")
#: JupyterHub's default ``server`` role (what a server token holds when nothing is asked).
DEFAULT_SERVER_SCOPES = ["users:activity!user", "access:servers!server"]
SERVICE_SCOPE = f"access:services!service={SERVICE}"
#: A Hub group with the first user (alice) in it.
GROUP = "team-a"


def proxy_command() -> str | None:
    """configurable-http-proxy as ``.ci/lib/chp.sh`` installs it, else from PATH."""
    cache = os.environ.get(
        "CLUSTER_PROVISIONERS_CACHE", str(Path.home() / ".cache" / "cluster-provisioners")
    )
    installed = Path(cache) / "bin" / "configurable-http-proxy"
    if installed.exists() and os.access(installed, os.X_OK):
        return str(installed)
    return shutil.which("configurable-http-proxy")


def require_hub() -> str:
    """The proxy's path; skip without JupyterHub or the proxy, fail under CI."""
    missing = []
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        missing.append("PyPI jupyterhub (pip install -e '.[test]')")
    proxy = proxy_command()
    if proxy is None:
        missing.append("npm configurable-http-proxy (bash .ci/lib/chp.sh)")
    if missing:
        reason = "missing " + " and ".join(missing)
        if engine_required("hub"):
            pytest.fail(f"JupyterHub is required here (CI) but unavailable: {reason}")
        pytest.skip(f"JupyterHub unavailable: {reason}")
    assert proxy is not None
    return proxy


def _config(hub: Hub, proxy: str) -> str:
    """jupyterhub_config.py for ``hub`` (Python: the token callable cannot be JSON)."""
    settings = {
        "bind_url": hub.base,
        "hub_bind_url": f"http://127.0.0.1:{hub.hub_port}",
        "db_url": f"sqlite:///{hub.root / 'jupyterhub.sqlite'}",
        "cookie_secret_file": str(hub.root / "cookie_secret"),
        "pid_file": str(hub.root / "jupyterhub.pid"),
        "authenticator_class": "dummy",
        "spawner_class": "simple",
        "services": [
            {"name": SERVICE, "api_token": hub.service_token},
            {"name": "tester", "api_token": hub.admin_token},
        ],
        "load_roles": [
            {"name": "gateway-service", "scopes": ["read:users"], "services": [SERVICE]},
            {"name": "admin", "services": ["tester"]},
            # Every user may reach the service (the README's form; JupyterHub 6 also has
            # JupyterHub.extra_user_scopes).
            {"name": "user", "scopes": ["self", SERVICE_SCOPE]},
        ],
        "load_groups": {GROUP: {"users": [hub.users[0]]}},
    }
    environment = {
        "JUPYTER_GATEWAY_URL": hub.gateway_url,
        "JUPYTER_GATEWAY_REQUEST_TIMEOUT": "120",
        "JUPYTER_GATEWAY_CONNECT_TIMEOUT": "60",
        "JUPYTER_CONFIG_DIR": str(hub.root / "user-config"),
    }
    home = str(hub.root / "home" / "{username}")
    lines = [
        "# Written by tests/helpers/hub.py",
        "c = get_config()  # noqa",
        *(f"c.JupyterHub.{key} = {value!r}" for key, value in settings.items()),
        f"c.ConfigurableHTTPProxy.command = [{proxy!r}]",
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{hub.proxy_api_port}'",
        f"c.ConfigurableHTTPProxy.auth_token = {uuid.uuid4().hex!r}",
        f"c.Authenticator.allowed_users = {set(hub.users)!r}",
        f"c.DummyAuthenticator.password = {hub.password!r}",
        f"c.SimpleLocalProcessSpawner.home_dir_template = {home!r}",
        f"c.Spawner.cmd = [{sys.executable!r}, '-m', 'jupyterhub.singleuser']",
        "c.Spawner.args = ['--allow-root']",
        "c.Spawner.start_timeout = 120",
        "c.Spawner.http_timeout = 120",
        f"c.Spawner.server_token_scopes = {hub.server_token_scopes!r}",
        # The user's own server token, never on a command line: a callable is called with
        # the spawner once its api_token is set.
        f"c.Spawner.environment = {{**{environment!r},",
        "    'JUPYTER_GATEWAY_AUTH_TOKEN': lambda spawner: spawner.api_token}",
    ]
    return "\n".join(lines) + "\n"


class Hub:
    """JupyterHub as a subprocess; a context manager. ``api()`` speaks its REST API as
    the ``tester`` (admin) service unless given another token."""

    def __init__(
        self,
        root: Path,
        gateway_url: str,
        *,
        users: tuple[str, ...] = USERS,
        server_token_scopes: list[str] | None = None,
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.gateway_url = gateway_url
        self.users = users
        self.password = uuid.uuid4().hex
        self.service_token = uuid.uuid4().hex
        self.admin_token = uuid.uuid4().hex
        self.server_token_scopes = server_token_scopes or [*DEFAULT_SERVER_SCOPES, SERVICE_SCOPE]
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        #: What our server's access layer is configured with.
        self.api_url = f"http://127.0.0.1:{self.hub_port}/hub/api"
        self.log_path = root / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Hub:
        proxy = require_hub()
        for user in self.users:
            (self.root / "home" / user).mkdir(parents=True, exist_ok=True)
        (self.root / "user-config").mkdir(exist_ok=True)
        config = self.root / "jupyterhub_config.py"
        config.write_text(_config(self, proxy))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY"))}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while self.api("GET", "")[0] != 200:
            assert self.proc.poll() is None, f"JupyterHub exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"JupyterHub did not start:\n{self.log()}"
            time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """``(status, JSON body or text)`` of ``/hub/api/<path>`` through the proxy;
        status 0 when nothing answers."""
        return request(method, f"{self.base}/hub/api/{path}", token or self.admin_token, body)

    def start_server(self, user: str, timeout: float = 150) -> str:
        """Start ``user``'s server and wait until the Hub reports it ready; its URL
        through the proxy (``.../user/<name>/``)."""
        status, reply = self.api("POST", f"users/{user}/server")
        assert status in (201, 202), f"starting {user}'s server: {status} {reply}"
        deadline = time.monotonic() + timeout
        while True:
            status, model = self.api("GET", f"users/{user}")
            server = (model.get("servers") or {}).get("", {}) if status == 200 else {}
            if server.get("ready"):
                return f"{self.base}{server['url']}"
            assert time.monotonic() < deadline, f"{user}'s server not ready: {model}\n{self.log()}"
            time.sleep(0.5)

    def stop_server(self, user: str) -> None:
        self.api("DELETE", f"users/{user}/server")

    def token(self, user: str, scopes: list[str], note: str = "test") -> str:
        """A new API token of ``user`` with ``scopes`` (as a user gets one from the
        Hub's token page)."""
        body = {"scopes": scopes, "note": note, "expires_in": 3600}
        status, reply = self.api("POST", f"users/{user}/tokens", body)
        assert status == 201, f"token for {user}: {status} {reply}"
        return str(reply["token"])

    def stop(self) -> None:
        """Stop the Hub (it stops the users' servers and the proxy); anything it left
        running is killed by pid."""
        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.proc.poll() is None:
            for user in self.users:
                self.stop_server(user)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.proc = None


def request(method: str, url: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    """One HTTP request with ``Authorization: token <token>``: ``(status, JSON or
    text)``; status 0 when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


class Client:
    """One user's requests to one server (our server, or their single-user server through
    the Hub's proxy): REST and a kernel's websocket, with one token."""

    def __init__(self, name: str, base: str, token: str) -> None:
        self.name = name
        self.base = base.rstrip("/") + "/"
        self.token = token

    def __repr__(self) -> str:
        return f"Client({self.name!r}, {self.base!r})"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return request(method, self.base + path, self.token, body)

    async def arequest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """:meth:`request` in a thread (the test's event loop keeps running)."""
        import asyncio

        return await asyncio.to_thread(self.request, method, path, body)

    def ws_url(self, kernel_id: str, session: str) -> str:
        base = self.base.replace("http://", "ws://", 1)
        return f"{base}api/kernels/{kernel_id}/channels?session_id={session}"

    async def run(self, kernel_id: str, code: str, timeout: float = 120) -> dict[str, str]:
        """Run ``code`` on ``kernel_id`` over a websocket of its own."""
        from websockets.asyncio.client import connect

        from tests.jupyter_server import until_answering, ws_execute

        session = uuid.uuid4().hex
        headers = {"Authorization": f"token {self.token}"}
        async with connect(self.ws_url(kernel_id, session), additional_headers=headers) as ws:
            await until_answering(ws, session, timeout=timeout)
            return await ws_execute(ws, session, code, timeout)


#: The Docker kernelspec every user starts: a bind mount per user, a cpu parameter.
KERNELSPEC = "docker-user"
MOUNT = "/home/jovyan/work"
MAX_KERNELS = 2
#: CPUs one user's kernels may request in all (the kernelspec's ``cpu`` parameter).
MAX_CPU = 2.0
#: The same kernelspec for the Hub group GROUP only.
GROUP_KERNELSPEC = "docker-team-a"
PARAMETERS = {"cpu": {"type": "number", "minimum": 0.5, "maximum": 2, "default": 1}}


@dataclass
class Site:
    hub: Hub
    gateway: JupyterServer
    homes: Path
    #: Each user's single-user server (through the proxy), with a token of theirs for it.
    servers: dict[str, Client]
    #: Each user straight at our server, with a Hub token carrying the service's scope.
    direct: dict[str, Client]

    @property
    def admin(self) -> Client:
        """Our server's own token: an admin."""
        return Client("admin", self.gateway.base, self.gateway.token)


@contextlib.contextmanager
def hub_site(root: Path) -> Iterator[Site]:
    """Our server (the access extension, resolving users through the Hub, at most
    ``MAX_KERNELS`` kernels and ``MAX_CPU`` CPUs per user, the Docker kernelspec
    ``KERNELSPEC``) and a Hub
    whose users' servers are started and use it as their gateway; stopped on exit."""
    require_hub()
    homes = root / "homes"
    for user in USERS:
        (homes / user).mkdir(parents=True)
        (homes / user).chmod(0o777)  # the kernel's user in the image is not root's uid
    port = free_port()
    hub = Hub(root / "hub", f"http://127.0.0.1:{port}/")
    config = root / "gateway-config"
    config.mkdir()
    settings = {
        "ServerApp": {
            "jpserver_extensions": {"provisioners.access": True},
            "identity_provider_class": "provisioners.access.AccessIdentityProvider",
        },
        "KernelAccess": {
            "hub_api_url": hub.api_url,
            "hub_service_name": SERVICE,
            "max_kernels_per_user": MAX_KERNELS,
            "max_cpu_per_user": MAX_CPU,
        },
    }
    (config / "jupyter_server_config.json").write_text(json.dumps(settings))
    env = {
        "JUPYTER_CONFIG_DIR": str(config),
        # The service's own token (read:users): what the chart passes from its Secret.
        "JUPYTERHUB_API_TOKEN": hub.service_token,
    }
    gateway = JupyterServer(root / "gateway", env=env, port=port)
    docker_settings = {
        "image": KERNEL_TEST_IMAGE,
        "sweep_on_start": False,
        "volumes": [f"{homes}/{{username}}:{MOUNT}"],
    }
    write_kernelspec(
        gateway.kernels,
        KERNELSPEC,
        "cluster-docker-provisioner",
        docker_settings,
        argv=CONTAINER_ARGV,
        metadata={"parameters": PARAMETERS},
    )
    write_kernelspec(
        gateway.kernels,
        GROUP_KERNELSPEC,
        "cluster-docker-provisioner",
        docker_settings,
        argv=CONTAINER_ARGV,
        metadata={"allowed_groups": [GROUP]},
    )
    with gateway, hub:
        servers, direct = {}, {}
        for user in USERS:
            url = hub.start_server(user)
            token = hub.token(user, [f"access:servers!user={user}"], note="server")
            servers[user] = Client(user, url, token)
            token = hub.token(user, [f"access:services!service={SERVICE}"], note="gateway")
            direct[user] = Client(user, gateway.base, token)
        yield Site(hub, gateway, homes, servers, direct)

"""A real JupyterHub for tests: PyPI ``jupyterhub`` with npm's configurable-http-proxy.

``Hub(root, gateway_url)`` runs JupyterHub 6 as a subprocess on 127.0.0.1 free ports: the
dummy authenticator (users ``alice`` and ``bob``, one password), the simple local-process
spawner, and two services:

- ``gateway``, our server: an ``api_token`` and a role granting ``read:users`` (what the
  access layer needs to resolve a user's token and read their groups);
- ``tester``, the test's driver: the ``admin`` role, to start servers and issue tokens.

Each user's single-user server runs in gateway mode against ``gateway_url``, sending its
own Hub API token as ``GatewayClient.auth_token``. The token reaches it through
``Spawner.environment`` (a callable returning ``spawner.api_token`` into
``JUPYTER_GATEWAY_AUTH_TOKEN``), never on a command line. ``c.Spawner.server_token_scopes``
is the Hub's default ``server`` role plus ``access:services!service=gateway``, and every
user holds that scope (``JupyterHub.extra_user_scopes``): a server token gets only the
requested scopes its user holds.

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
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import engine_required
from tests.jupyter_server import free_port

SERVICE = "gateway"
USERS = ("alice", "bob")
#: JupyterHub's default ``server`` role (what a server token holds when nothing is asked).
DEFAULT_SERVER_SCOPES = ["users:activity!user", "access:servers!server"]
SERVICE_SCOPE = f"access:services!service={SERVICE}"


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
        ],
        "extra_user_scopes": [SERVICE_SCOPE],
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

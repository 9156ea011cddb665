"""One Kubernetes API client per event loop (in practice the engine loop, see
:mod:`.loop`), speaking plain JSON.

kubernetes_asyncio loads the kubeconfig (or the in-cluster service account), holds the
aiohttp session with the cluster's TLS settings and refreshes tokens; on top of it
:class:`KubeClient` sends plain-dict requests (the manifests are plain dicts), streams
watches line by line and opens the websockets of ``pods/exec`` and ``pods/portforward``
with the same credentials. Every request has a timeout; idempotent ones are retried with
a bounded backoff on connection errors and 429/5xx answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from .. import metrics
from ..exceptions import EngineUnavailableError, ProvisionerError
from ..podenv import SERVICE_ACCOUNT_DIR, incluster_config_usable
from .loop import KUBERNETES_EXECUTOR

__all__ = [
    "KUBERNETES_EXECUTOR",
    "TRANSIENT_STATUSES",
    "Conflict",
    "Forbidden",
    "Gone",
    "KubeApiError",
    "KubeClient",
    "NotFound",
    "Unauthorized",
    "acquire_client",
    "close_clients",
    "release_client",
    "resource_path",
]
#: API answers worth another try of an idempotent request (0: the server was not reached).
TRANSIENT_STATUSES = frozenset({0, 429, 500, 502, 503, 504})
_RETRY_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError)

log = logging.getLogger(__name__)


class KubeApiError(ProvisionerError):
    """The API server refused a request (``status`` is 0 when it could not be reached).

    Built as the named subclass of its status (:class:`Unauthorized`, :class:`NotFound`,
    :class:`Forbidden`, :class:`Conflict`, :class:`Gone`) where there is one, so callers
    catch by name.
    """

    #: The HTTP status this class stands for (0: any other).
    code = 0

    def __new__(cls, status: int, reason: str = "", message: str = "") -> KubeApiError:
        named = _BY_STATUS.get(status, cls) if cls is KubeApiError else cls
        return super().__new__(named)

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message or reason or f"HTTP {status}", target="kubernetes")
        self.status = status
        self.reason = reason

    @property
    def transient(self) -> bool:
        """Whether the same idempotent request may succeed if tried again."""
        return self.status in TRANSIENT_STATUSES

    @property
    def unreachable(self) -> bool:
        """Whether the API server was not reached at all (no answer, no connection)."""
        return self.status == 0

    @classmethod
    def from_body(cls, status: int, body: bytes | str, fallback: str = "") -> KubeApiError:
        """Build from a ``Status`` body (``reason``, ``message``), whatever the server sent."""
        reason, message = "", ""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        if isinstance(data, dict):
            reason = str(data.get("reason") or "")
            message = str(data.get("message") or "")
        if not message:
            text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
            message = text.strip()[:500] or fallback
        return cls(status, reason, message)


class NotFound(KubeApiError):
    """404: the object (or its namespace) does not exist."""

    code = 404


class Unauthorized(KubeApiError):
    """401: the credentials were refused (an expired or revoked token)."""

    code = 401


class Forbidden(KubeApiError):
    """403: the service account's role does not allow the request."""

    code = 403


class Conflict(KubeApiError):
    """409: the object exists already, or changed under the request."""

    code = 409


class Gone(KubeApiError):
    """410: a watch's resource version is too old."""

    code = 410


_BY_STATUS: dict[int, type[KubeApiError]] = {
    c.code: c for c in (Unauthorized, NotFound, Forbidden, Conflict, Gone)
}


def resource_path(
    kind: str, namespace: str, name: str = "", subresource: str = "", group: str = ""
) -> str:
    """The API path of namespaced ``kind`` (plural: pods, secrets, events...), of object
    ``name`` and its ``subresource`` when given; ``group`` is 'apis/GROUP/VERSION' for
    kinds outside the core v1 API. The one place such paths are built."""
    path = f"/{group or 'api/v1'}/namespaces/{namespace}/{kind}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def default_namespace() -> str:
    """$CLUSTER_PROVISIONERS_NAMESPACE, else this pod's namespace in-cluster, else 'default'."""
    env = os.environ.get("CLUSTER_PROVISIONERS_NAMESPACE", "")
    if env:
        return env
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


def resolve_kubeconfig(path: str) -> str:
    """The kubeconfig to load ('' for in-cluster config): ``path``, $KUBECONFIG, the
    service account when in a pod, else ~/.kube/config."""
    if path:
        return os.path.expanduser(path)
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    if incluster_config_usable():
        return ""
    return os.path.expanduser("~/.kube/config")


class KubeClient:
    """Plain-JSON requests, watches and websockets over one kubernetes_asyncio ApiClient."""

    def __init__(self, api: ApiClient, *, in_cluster: bool, timeout: float = 10.0) -> None:
        self.api = api
        self.in_cluster = in_cluster
        self.timeout = timeout
        self.reflectors: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls, kubeconfig: str = "", context: str = "", timeout: float = 10.0
    ) -> KubeClient:
        """Load the configuration (see :func:`resolve_kubeconfig`) and build a client.

        Raises :class:`EngineUnavailableError` when there is no usable configuration.
        """
        path = resolve_kubeconfig(kubeconfig)
        cfg = Configuration()
        try:
            if path:
                if not any(Path(p).expanduser().exists() for p in path.split(os.pathsep) if p):
                    msg = f"no kubeconfig at {path!r} and not running in a cluster"
                    metrics.record_engine_error("kubernetes", "unreachable")
                    raise EngineUnavailableError(msg, target="kubernetes")
                await load_kube_config(
                    config_file=path,
                    context=context or None,
                    client_configuration=cfg,
                    persist_config=False,
                )
            else:
                load_incluster_config(client_configuration=cfg)
        except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
            msg = f"cannot load the Kubernetes configuration ({path or 'in-cluster'}): {exc}"
            metrics.record_engine_error("kubernetes", "unreachable")
            raise EngineUnavailableError(msg, target="kubernetes") from exc
        return cls(ApiClient(configuration=cfg), in_cluster=not path, timeout=timeout)

    async def close(self) -> None:
        """Stop the reflectors and close the HTTP session."""
        for reflector in list(self.reflectors.values()):
            await reflector.stop()
        self.reflectors.clear()
        await self.api.close()

    # ------------------------------------------------------------------ requests

    async def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        body: Any,
        timeout: aiohttp.ClientTimeout,
        content_type: str = "application/json",
    ) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            return await self.api.call_api(
                path,
                method,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except _RETRY_ERRORS as exc:
            raise KubeApiError(0, "Unreachable", f"{method} {path}: {_describe(exc)}") from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        body: Any = None,
        timeout: float | None = None,
        retries: int = 3,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """Send a request and return the JSON answer; raise :class:`KubeApiError` on failure.

        GET and DELETE are retried (``retries`` times, backoff 0.2 s doubling to 2 s) on
        connection errors and 429/5xx; other methods are sent once. ``content_type`` is
        the body's (e.g. ``application/merge-patch+json`` for a PATCH).
        """
        query = list(query)
        timeout = timeout or self.timeout
        attempts = 1 + (retries if method in ("GET", "DELETE") else 0)
        delay = 0.2
        for attempt in range(attempts):
            try:
                resp = await asyncio.wait_for(
                    self._send(
                        method,
                        path,
                        query,
                        body,
                        aiohttp.ClientTimeout(total=timeout),
                        content_type,
                    ),
                    timeout + 1,
                )
                async with resp:
                    data = await asyncio.wait_for(resp.read(), timeout)
                    status = resp.status
            except asyncio.TimeoutError as exc:
                error = KubeApiError(0, "Timeout", f"{method} {path}: no answer in {timeout:g} s")
                error.__cause__ = exc
            except aiohttp.ClientError as exc:
                error = KubeApiError(0, "Unreachable", f"{method} {path}: {_describe(exc)}")
                error.__cause__ = exc
            except KubeApiError as exc:
                error = exc
            else:
                if 200 <= status < 300:
                    return json.loads(data) if data else {}
                error = KubeApiError.from_body(status, data, f"{method} {path}: HTTP {status}")
            retryable = error.transient
            if not retryable or attempt == attempts - 1:
                raise counted(error)
            log.debug("%s %s failed (%s); retrying in %.1f s", method, path, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def request_text(
        self,
        path: str,
        query: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
        *,
        count: bool = True,
    ) -> str:
        """GET a plain-text resource (a container log); raise :class:`KubeApiError`
        (counted in the engine errors metric unless ``count`` is False)."""
        try:
            return await self._get_text(path, query, timeout or self.timeout)
        except KubeApiError as exc:
            if count:
                counted(exc)
            raise

    async def _get_text(self, path: str, query: Iterable[tuple[str, str]], timeout: float) -> str:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            resp = await asyncio.wait_for(
                self._send("GET", path, list(query), None, client_timeout), timeout + 1
            )
            async with resp:
                data = await asyncio.wait_for(resp.read(), timeout)
        except asyncio.TimeoutError as exc:
            raise KubeApiError(0, "Timeout", f"GET {path}: no answer in {timeout:g} s") from exc
        except aiohttp.ClientError as exc:
            raise KubeApiError(0, "Unreachable", f"GET {path}: {_describe(exc)}") from exc
        if not 200 <= resp.status < 300:
            raise KubeApiError.from_body(resp.status, data, f"GET {path}: HTTP {resp.status}")
        return data.decode(errors="replace")

    async def watch(
        self, path: str, query: Iterable[tuple[str, str]], timeout_seconds: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the events of one watch request (``watch=true``) until the server ends it."""
        query = [*query, ("watch", "true"), ("timeoutSeconds", str(int(timeout_seconds)))]
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=timeout_seconds + 30
        )
        try:
            sent = self._send("GET", path, query, None, timeout)
            resp = await asyncio.wait_for(sent, self.timeout)
        except KubeApiError as exc:
            counted(exc)
            raise
        except asyncio.TimeoutError:
            metrics.record_engine_error("kubernetes", "timeout")
            raise
        try:
            if resp.status != 200:
                body = await asyncio.wait_for(resp.read(), self.timeout)
                error = KubeApiError.from_body(
                    resp.status, body, f"watch {path}: HTTP {resp.status}"
                )
                raise counted(error)
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        except aiohttp.ClientError as exc:
            error = KubeApiError(0, "Unreachable", f"watch {path}: {_describe(exc)}")
            raise counted(error) from exc
        finally:
            resp.close()

    async def websocket(
        self,
        path: str,
        query: Iterable[tuple[str, str]],
        protocols: Sequence[str],
        timeout: float | None = None,
    ) -> aiohttp.ClientWebSocketResponse:
        """Open a websocket (exec, portforward) with this client's credentials and TLS."""
        headers: dict[str, str] = {}
        await self.api.update_params_for_auth(headers, [], ["BearerToken"])
        cfg = self.api.configuration
        if cfg.username and "authorization" not in headers:
            headers["authorization"] = cfg.get_basic_auth_token()
        url = (cfg.host or "").rstrip("/") + path
        query = list(query)
        if query:
            url += "?" + urlencode(query)
        if url.startswith("https://"):
            url = "wss://" + url[len("https://") :]
        elif url.startswith("http://"):
            url = "ws://" + url[len("http://") :]
        extra: dict[str, Any] = {}
        if cfg.tls_server_name:
            extra["server_hostname"] = cfg.tls_server_name
        if cfg.proxy:
            extra["proxy"] = cfg.proxy
        session = self.api.rest_client.pool_manager
        try:
            return await asyncio.wait_for(
                session.ws_connect(
                    url, headers=headers, protocols=tuple(protocols), max_msg_size=0, **extra
                ),
                timeout or self.timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            msg = f"websocket {path}: HTTP {exc.status} {exc.message}"
            if exc.status in (401, 403):  # the handshake drops the Status: ask again plainly
                msg = await self._refusal(path, query) or msg
            raise counted(KubeApiError(exc.status, "Handshake", msg)) from exc
        except asyncio.TimeoutError as exc:
            raise counted(KubeApiError(0, "Timeout", f"websocket {path}: no answer")) from exc
        except aiohttp.ClientError as exc:
            error = KubeApiError(0, "Unreachable", f"websocket {path}: {_describe(exc)}")
            raise counted(error) from exc

    async def _refusal(self, path: str, query: list[tuple[str, str]]) -> str:
        """The API's own message for a refused request to ``path`` ('' if none); the
        refusal itself is counted once, by :meth:`websocket`."""
        try:
            await self.request_text(path, query, timeout=self.timeout, count=False)
        except (Unauthorized, Forbidden) as exc:
            return str(exc)
        except KubeApiError:
            return ""
        return ""


def counted(error: KubeApiError) -> KubeApiError:
    """``error``, counted in the engine API errors metric (the one place that counts
    a failed request, so each is counted once)."""
    timed_out = error.reason == "Timeout"
    metrics.record_engine_error(
        "kubernetes", metrics.http_error_kind(error.status, timed_out=timed_out)
    )
    return error


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------- one client per loop


@dataclass
class _Shared:
    client: KubeClient
    users: set[int] = field(default_factory=set)


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], _Shared]] = (
    weakref.WeakKeyDictionary()
)
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def acquire_client(user: object, kubeconfig: str = "", context: str = "") -> KubeClient:
    """The client shared by this event loop for (kubeconfig, context), held for ``user``.

    Each holder calls :func:`release_client` when done; the last one closes it.
    """
    loop = asyncio.get_running_loop()
    lock = _LOCKS.setdefault(loop, asyncio.Lock())
    key = (resolve_kubeconfig(kubeconfig), context)
    async with lock:
        clients = _SHARED.setdefault(loop, {})
        shared = clients.get(key)
        if shared is None:
            shared = _Shared(await KubeClient.connect(kubeconfig, context))
            clients[key] = shared
        shared.users.add(id(user))
        return shared.client


async def release_client(user: object, client: KubeClient) -> None:
    """Drop ``user``'s hold on ``client``; close it when nobody holds it any more."""
    loop = asyncio.get_running_loop()
    lock = _LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
        clients = _SHARED.get(loop, {})
        for key, shared in list(clients.items()):
            if shared.client is client:
                shared.users.discard(id(user))
                if not shared.users:
                    del clients[key]
                    await client.close()
                return


async def close_clients() -> None:
    """Close every client this event loop still shares (when the loop stops)."""
    loop = asyncio.get_running_loop()
    clients = _SHARED.pop(loop, {})
    for shared in clients.values():
        await shared.client.close()

"""Who sent a request: the server's token (an admin), a token file, or JupyterHub.

A token is never logged, kept only as its SHA-256 digest, and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from jupyter_server.auth import IdentityProvider
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from .policy import AccessError, AccessUser, KernelAccess


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class HubUnavailable(AccessError):
    """JupyterHub's API did not answer: the request fails with 503, never as an admin."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, f"Cannot authenticate through JupyterHub: {reason}")


@dataclass(frozen=True)
class _FileUser:
    name: str
    groups: tuple[str, ...]
    admin: bool


class TokenFile:
    """The token file's users, read again whenever the file changes (its mtime, size or
    inode: a mounted Secret is replaced through a symlink swap)."""

    def __init__(self, path: str, log: Any) -> None:
        self.path = path
        self.log = log
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[bytes, _FileUser] = {}

    def lookup(self, token: str) -> _FileUser | None:
        """The user of ``token``, or None."""
        self._refresh()
        # Looked up by the token's SHA-256: how long a lookup takes says nothing about
        # the tokens (a timing difference would be about a digest, not a token's prefix).
        return self._users.get(_digest(token))

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp != (0, 0, 0):
                self.log.error("Access token file %s unreadable: %s", self.path, exc.strerror)
                self._stamp, self._users = (0, 0, 0), {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            # keep the users read last (a file caught half-written); say so once per change
            self.log.error("Access token file %s is not valid JSON: %s", self.path, exc)
            return
        self._users = self._parse(data)
        self.log.info("Access token file %s: %d user token(s)", self.path, len(self._users))

    def _parse(self, data: Any) -> dict[bytes, _FileUser]:
        if not isinstance(data, dict):
            self.log.error(
                "Access token file %s: expected an object {token: {name, groups, admin}}",
                self.path,
            )
            return {}
        users: dict[bytes, _FileUser] = {}
        for index, (token, entry) in enumerate(data.items()):
            where = f"entry {index + 1}"
            if isinstance(entry, str):
                entry = {"name": entry}
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name:
                where = f"the entry of user {name!r}"
            groups = entry.get("groups", []) if isinstance(entry, dict) else None
            admin = entry.get("admin", False) if isinstance(entry, dict) else None
            problem = ""
            if not isinstance(token, str) or len(token) < 8:
                problem = "its token is shorter than 8 characters"
            elif not isinstance(name, str) or not name:
                problem = "'name' must be a non-empty string"
            elif not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                problem = "'groups' must be a list of strings"
            elif not isinstance(admin, bool):
                problem = "'admin' must be true or false"
            if problem:
                self.log.error("Access token file %s: %s skipped: %s", self.path, where, problem)
                continue
            assert isinstance(name, str) and isinstance(groups, list)
            users[_digest(token)] = _FileUser(name, tuple(groups), bool(admin))
        return users


class AccessIdentityProvider(IdentityProvider):
    """Identifies each request by its token (``Authorization: token|bearer <t>`` or
    ``?token=<t>``): the server's own token is an admin, the ``KernelAccess.token_file``
    maps tokens to users, and with ``KernelAccess.hub_api_url`` any other token is
    resolved through JupyterHub (cached ``KernelAccess.cache_ttl`` seconds).

    No login cookie is set or read: every request carries its token.

    Set with ``c.ServerApp.identity_provider_class`` (the ``provisioners.access``
    extension sets it when it is left at Jupyter Server's default).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._token_files: dict[str, TokenFile] = {}
        #: token digest -> (expiry on the monotonic clock, user or None)
        self._cache: dict[bytes, tuple[float, AccessUser | None]] = {}
        self._inflight: dict[bytes, asyncio.Future[AccessUser | None]] = {}
        self.hub_requests = 0  # requests made to the Hub (for tests and logs)

    @property
    def access(self) -> KernelAccess:
        """The access settings (``c.KernelAccess``)."""
        return KernelAccess.instance(parent=self.parent, log=self.log)

    @property
    def auth_enabled(self) -> bool:
        return True

    @property
    def login_available(self) -> bool:
        return False

    def get_user_cookie(self, handler: web.RequestHandler) -> None:
        return None

    def set_login_cookie(self, handler: web.RequestHandler, user: Any) -> None:
        return None

    async def get_user(self, handler: web.RequestHandler) -> AccessUser | None:  # type: ignore[override]
        """The request's user, None when its token is unknown (the request gets 403)."""
        current = getattr(handler, "_jupyter_current_user", None)
        if isinstance(current, AccessUser):
            return current
        token = self.get_token(handler)
        if not token:
            return None
        user = await self.user_for_token(token)
        if user is not None:
            handler._token_authenticated = True  # type: ignore[attr-defined]
        else:
            self.log.warning(
                "Unknown token from %s for %s", handler.request.remote_ip, handler.request.path
            )
        return user

    async def user_for_token(self, token: str) -> AccessUser | None:
        """The user ``token`` identifies; None when no source knows it. Raises 503
        (:class:`HubUnavailable`) when JupyterHub must be asked and does not answer."""
        access = self.access
        own = str(self.token or "")
        if own and hmac.compare_digest(_digest(own), _digest(token)):
            name = access.token_admin_name
            return AccessUser(username=name, admin=True)
        user = None
        if access.token_file:
            tokens = self._token_files.get(access.token_file)
            if tokens is None:
                tokens = self._token_files[access.token_file] = TokenFile(
                    access.token_file, self.log
                )
            entry = tokens.lookup(token)
            if entry is not None:
                groups = list(entry.groups)
                admin = access.is_admin(entry.name, groups, entry.admin)
                user = AccessUser(username=entry.name, groups=groups, admin=admin)
        if user is None and access.hub_api_url:
            user = await self._hub_user(token)
        if user is not None and user.username == access.token_admin_name and not user.admin:
            # would own the kernels started with the server's token
            self.log.error(
                "User %r refused: the name of the server token's admin "
                "(KernelAccess.token_admin_name) is not a user's",
                user.username,
            )
            return None
        return user

    # -- JupyterHub -------------------------------------------------------------------

    async def _hub_user(self, token: str) -> AccessUser | None:
        key = _digest(token)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = self._inflight.get(key)
        if pending is not None:  # one Hub request for concurrent requests with one token
            return await asyncio.shield(pending)
        future: asyncio.Future[AccessUser | None] = asyncio.ensure_future(self._hub_lookup(token))
        self._inflight[key] = future
        try:
            user = await asyncio.shield(future)
        finally:
            self._inflight.pop(key, None)
        access = self.access
        ttl = access.cache_ttl if user is not None else access.negative_cache_ttl
        if ttl > 0:
            now = time.monotonic()
            if len(self._cache) > 10000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + ttl, user)
        return user

    async def _hub_get(self, path: str, token: str) -> HTTPResponse:
        access = self.access
        url = access.hub_api_url.rstrip("/") + path
        request = HTTPRequest(
            url,
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            request_timeout=access.hub_request_timeout,
            connect_timeout=access.hub_request_timeout,
            follow_redirects=False,
        )
        self.hub_requests += 1
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except Exception as exc:  # DNS, TLS: whatever the client raises itself
            self.log.error("JupyterHub API %s unreachable: %s", url, exc)
            raise HubUnavailable(f"JupyterHub at {access.hub_api_url} unreachable") from None
        if response.code == 599 or response.code >= 500:
            error = response.error or f"HTTP {response.code}"
            self.log.error("JupyterHub API %s unavailable: %s", url, error)
            raise HubUnavailable(f"JupyterHub at {access.hub_api_url} unavailable")
        return response

    async def _hub_lookup(self, token: str) -> AccessUser | None:
        access = self.access
        response = await self._hub_get("/user", token)
        if response.code in (401, 403, 404):
            self.log.info("JupyterHub does not know a token (HTTP %d)", response.code)
            return None
        if response.code != 200:
            self.log.warning("JupyterHub answered HTTP %d for a token: refused", response.code)
            return None
        try:
            model = json.loads(response.body)
        except ValueError:
            self.log.error("JupyterHub's /user answer is not JSON: token refused")
            return None
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            self.log.error("JupyterHub's /user answer has no user name: token refused")
            return None
        name: str = model["name"]
        if model.get("kind", "user") != "user":
            self.log.warning(
                "JupyterHub token of %s %r refused: only users' tokens are accepted",
                model.get("kind"),
                name,
            )
            return None
        scopes = model.get("scopes") or []
        wanted = f"access:services!service={access.hub_service_name}"
        if not ("access:services" in scopes or (access.hub_service_name and wanted in scopes)):
            self.log.warning(
                "JupyterHub token of user %r refused: it lacks the scope %s "
                "(grant it with c.Spawner.server_token_scopes or the user's roles)",
                name,
                wanted,
            )
            return None
        groups = model.get("groups")
        if not isinstance(groups, list):
            groups = await self._hub_groups(name)
        groups = [str(g) for g in groups]
        admin = access.is_admin(name, groups, bool(model.get("admin")))
        return AccessUser(username=name, groups=groups, admin=admin)

    async def _hub_groups(self, name: str) -> list[str]:
        """``name``'s groups read with this service's own token ([] without one)."""
        access = self.access
        if not access.hub_api_token:
            self.log.debug("No groups for %r: no KernelAccess.hub_api_token", name)
            return []
        response = await self._hub_get(f"/users/{quote(name, safe='')}", access.hub_api_token)
        if response.code != 200:
            self.log.warning(
                "Cannot read the groups of JupyterHub user %r (HTTP %d): the service's token "
                "needs the scope read:users or read:users:groups",
                name,
                response.code,
            )
            return []
        try:
            groups = json.loads(response.body).get("groups")
        except (ValueError, AttributeError):
            groups = None
        return [str(g) for g in groups] if isinstance(groups, list) else []

"""Jupyter Server's kernel, session and kernelspec handlers, per user.

Registered by the ``provisioners.access`` extension on the same URLs as Jupyter Server's
own; tornado routes an extension's handlers first (``Application.add_handlers`` inserts
their rule before the default one). Lists show a user's own kernels and sessions and the
kernelspecs they may use (admins see all); starts check the kernelspec's groups, the
launch parameters and the user's quotas, and set ``KERNEL_USERNAME`` from the identity.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_core.utils import ensure_async
from jupyter_server._tz import isoformat, utcfromtimestamp
from jupyter_server.auth.decorator import authorized
from jupyter_server.services.api.handlers import APIStatusHandler
from jupyter_server.services.kernels.handlers import MainKernelHandler
from jupyter_server.services.kernelspecs.handlers import MainKernelSpecHandler
from jupyter_server.services.sessions.handlers import SessionHandler, SessionRootHandler
from jupyter_server.utils import url_escape, url_path_join
from tornado import web

from ..parameters import LaunchBounds, resolve_parameters
from .policy import AccessError, KernelAccess

#: Variables a start request's body may set in the kernel's environment (what a gateway
#: client sends); KERNEL_USERNAME is always the identity's name.
REQUEST_ENV_PREFIX = "KERNEL_"


class AccessHandlerMixin:
    """What the access handlers share: the settings, starting a kernel for the request's
    user, and error replies with an :class:`AccessError`'s message as written."""

    # provided by JupyterHandler
    current_user: Any
    kernel_manager: Any
    kernel_spec_manager: Any
    config: Any
    log: Any
    parent: Any

    @property
    def access(self) -> KernelAccess:
        return KernelAccess.instance()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, AccessError):
            handler: Any = self
            handler.set_header("Content-Type", "application/json")
            self.log.warning("wrote error: %r", exc.message)
            handler.finish(json.dumps({"message": exc.message, "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)  # type: ignore[misc]

    def _usage_of(self, kernel_id: str) -> tuple[float, int]:
        """(cpu, memory) a live kernel this server did not start for a user requested."""
        try:
            provisioner = getattr(self.kernel_manager.get_kernel(kernel_id), "provisioner", None)
        except KeyError:
            return 0.0, 0
        params = getattr(provisioner, "launch_parameters", None)
        cpu = getattr(params, "cpu", None) or 0.0
        memory = getattr(params, "memory_bytes", None) or 0
        return float(cpu), int(memory)

    async def start_for_user(
        self,
        kernel_name: str | None,
        *,
        path: str | None,
        env: Any = None,
        parameters: Any = None,
        server_env: Mapping[str, str] | None = None,
        kernel_id: str | None = None,
    ) -> str:
        """Start a kernel for the request's user: the kernelspec's groups (404 as for an
        unknown kernelspec), the launch parameters (400 naming one), the quotas (429/403),
        then ``km.start_kernel`` with ``KERNEL_USERNAME`` = the user's name. Returns the
        kernel id."""
        user = self.current_user
        km = self.kernel_manager
        access = self.access
        if kernel_name is not None and not isinstance(kernel_name, str):
            raise AccessError(400, "the kernel's 'name' must be a string")
        if path is not None and not isinstance(path, str):
            raise AccessError(400, "'path' must be a string")
        name = kernel_name or km.default_kernel_name
        try:
            spec = await ensure_async(self.kernel_spec_manager.get_kernel_spec(name))
        except KeyError:
            spec = None
        if spec is None or not access.may_use_spec(user, getattr(spec, "metadata", None)):
            raise AccessError(404, f"Kernel spec {name} not found")
        request_env = _request_env(env)
        request_env["KERNEL_USERNAME"] = user.username
        if parameters is not None and not isinstance(parameters, dict):
            raise AccessError(400, "'parameters' must be an object of launch parameter values")
        bounds = LaunchBounds.instance(config=self.config)
        try:
            params = resolve_parameters(spec, request_env, parameters, bounds=bounds)
        except ValueError as exc:  # LaunchParameterError, or a bad schema
            raise AccessError(getattr(exc, "status_code", 400), str(exc)) from None
        request_env.update(params.env(params.changed))  # the provisioner resolves them again
        kernel_id = kernel_id or str(uuid.uuid4())
        cpu, memory = params.cpu or 0.0, params.memory_bytes or 0
        with access.starting(km, user, kernel_id, cpu, memory, self._usage_of):
            full_env = {**(server_env or os.environ), **request_env}
            await ensure_async(
                km.start_kernel(kernel_name=name, path=path, kernel_id=kernel_id, env=full_env)
            )
        self.log.info("Kernel %s (%s) started for user %r", kernel_id, name, user.username)
        return kernel_id


def _request_env(env: Any) -> dict[str, str]:
    """The ``KERNEL_*`` variables of a request body's ``env`` (others are dropped: the
    gateway client sends its whole allowed environment); 400 for a malformed one."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise AccessError(400, "'env' must be an object of string values")
    chosen = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key.startswith(REQUEST_ENV_PREFIX):
            continue
        if not isinstance(value, str):
            raise AccessError(400, f"env {key[:64]!r} must be a string")
        if "\0" in value or "\0" in key:
            raise AccessError(400, f"env {key[:64]!r} contains a NUL character")
        chosen[key] = value
    return chosen


class AccessMainKernelHandler(AccessHandlerMixin, MainKernelHandler):
    """``/api/kernels``: the user's own kernels; starts checked and owned."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        km = self.kernel_manager
        user = self.current_user
        self.access.prune(km)
        kernels = await ensure_async(km.list_kernels())
        mine = [k for k in kernels if self.access.may_access(km, user, k["id"])]
        self.finish(json.dumps(mine, default=json_default))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        km = self.kernel_manager
        model = self.get_json_body() or {}
        if not isinstance(model, dict):
            raise AccessError(400, "The body must be a JSON object")
        kernel_id = model.get("kernel_id")
        if kernel_id is not None and not isinstance(kernel_id, str):
            raise AccessError(400, "'kernel_id' must be a string")
        if kernel_id and (kernel_id in km or not getattr(self.current_user, "admin", False)):
            # Jupyter Server's reconnection to an existing kernel: an access check, never a
            # claim (the kernel's owner stays); an unknown id is no start for a user.
            self.access.check_kernel(km, self.current_user, kernel_id)
        else:
            kernel_id = await self.start_for_user(
                model.get("name"),
                path=model.get("path"),
                env=model.get("env"),
                parameters=model.get("parameters"),
                kernel_id=kernel_id or None,
            )
        kernel = await ensure_async(km.kernel_model(kernel_id))
        location = url_path_join(self.base_url, "api", "kernels", url_escape(kernel_id))
        self.set_header("Location", location)
        self.set_status(201)
        self.finish(json.dumps(kernel, default=json_default))


class AccessMainKernelSpecHandler(AccessHandlerMixin, MainKernelSpecHandler):
    """``/api/kernelspecs``: the kernelspecs the user may use."""

    @property
    def kernel_spec_manager(self) -> Any:
        return _UsableSpecs(self.settings["kernel_spec_manager"], self.current_user)


class _UsableSpecs:
    """A kernelspec manager whose ``get_all_specs`` leaves out what ``user`` may not use."""

    def __init__(self, manager: Any, user: Any) -> None:
        self._manager = manager
        self._user = user

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    async def get_all_specs(self) -> dict[str, Any]:
        specs = await ensure_async(self._manager.get_all_specs())
        return {
            name: info
            for name, info in specs.items()
            if KernelAccess.may_use_spec(self._user, _metadata(info))
        }


def _kid(session: Mapping[str, Any]) -> str:
    """A session model's kernel id ("" without one)."""
    return str((session.get("kernel") or {}).get("id") or "")


def _metadata(info: Any) -> Mapping[str, Any] | None:
    if not isinstance(info, Mapping):
        return None
    spec = info.get("spec") if isinstance(info.get("spec"), Mapping) else info
    metadata = spec.get("metadata") if isinstance(spec, Mapping) else None
    return metadata if isinstance(metadata, Mapping) else None


class AccessSessionRootHandler(AccessHandlerMixin, SessionRootHandler):
    """``/api/sessions``: the user's own sessions (those of kernels they may use); a new
    session's kernel starts as ``POST /api/kernels`` starts one."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        km = self.kernel_manager
        sessions: list[dict[str, Any]] = await ensure_async(self.session_manager.list_sessions())
        mine = [s for s in sessions if self.access.may_access(km, self.current_user, _kid(s))]
        self.finish(json.dumps(mine, default=json_default))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        sm = self.session_manager
        km = self.kernel_manager
        user = self.current_user
        model = self.get_json_body()
        if not isinstance(model, dict):
            raise web.HTTPError(400, "No JSON data provided")
        if "notebook" in model and isinstance(model["notebook"], dict):
            model["type"] = "notebook"
            model["path"] = model["notebook"].get("name") or model["notebook"].get("path")
        path, mtype = model.get("path"), model.get("type")
        if path is None:
            raise web.HTTPError(400, "Missing field in JSON data: path")
        if mtype is None:
            raise web.HTTPError(400, "Missing field in JSON data: type")
        name = model.get("name")
        kernel = model.get("kernel") or {}
        if not isinstance(kernel, dict):
            raise AccessError(400, "'kernel' must be an object")
        kernel_id = kernel.get("id")
        # the user's own session at this path, if any (another user's is not theirs)
        sessions: list[dict[str, Any]] = await ensure_async(sm.list_sessions())
        for session in sessions:
            if session.get("path") == path and self.access.may_access(km, user, _kid(session)):
                self._created(session)
                return
        if kernel_id and (kernel_id in km or not getattr(user, "admin", False)):
            self.access.check_kernel(km, user, kernel_id)
        else:
            kernel_path = await ensure_async(sm.contents_manager.get_kernel_path(path=path))
            kernel_id = await self.start_for_user(
                kernel.get("name"),
                path=kernel_path,
                env=kernel.get("env"),
                parameters=kernel.get("parameters"),
                server_env=sm.get_kernel_env(path, name),
                kernel_id=kernel_id or None,
            )
        session = await sm.create_session(
            path=path, name=name, type=mtype, kernel_name=None, kernel_id=kernel_id
        )
        self._created(session)

    def _created(self, session: dict[str, Any]) -> None:
        self.set_header("Location", url_path_join(self.base_url, "api", "sessions", session["id"]))
        self.set_status(201)
        self.finish(json.dumps(session, default=json_default))


class AccessSessionHandler(AccessHandlerMixin, SessionHandler):
    """``/api/sessions/<id>``: Jupyter Server's, with a change of kernel checked: another
    kernel must be the user's own (404), a new one starts as ``POST /api/kernels`` does."""

    _body: dict[str, Any] | None = None

    def get_json_body(self) -> dict[str, Any] | None:
        if self._body is not None:
            return self._body
        return super().get_json_body()

    @web.authenticated
    @authorized
    async def patch(self, session_id: str) -> None:
        model = super().get_json_body()
        if not isinstance(model, dict):
            raise web.HTTPError(400, "No JSON data provided")
        kernel = model.get("kernel")
        if isinstance(kernel, dict):
            km = self.kernel_manager
            if kernel.get("id") is not None:
                self.access.check_kernel(km, self.current_user, str(kernel["id"]))
            elif kernel.get("name") is not None:
                before = await self.session_manager.get_session(session_id=session_id)
                sm = self.session_manager
                kernel_path = await ensure_async(
                    sm.contents_manager.get_kernel_path(path=before["path"])
                )
                new_id = await self.start_for_user(
                    kernel["name"],
                    path=kernel_path,
                    env=kernel.get("env"),
                    parameters=kernel.get("parameters"),
                    server_env=sm.get_kernel_env(before["path"], before["name"]),
                )
                model = {**model, "kernel": {"id": new_id}}
        self._body = model
        # Jupyter Server's own patch, on the checked body (its @authorized runs again)
        await SessionHandler.patch.__wrapped__(self, session_id)  # type: ignore[attr-defined]


class AccessAPIStatusHandler(AccessHandlerMixin, APIStatusHandler):
    """``/api/status``: a user's own kernels and connections are counted, not everyone's."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        km = self.kernel_manager
        kernels = await ensure_async(km.list_kernels())
        mine = [k for k in kernels if self.access.may_access(km, self.current_user, k["id"])]
        model = {
            "started": isoformat(self.settings.get("started", utcfromtimestamp(0))),
            "last_activity": isoformat(self.application.last_activity()),  # type: ignore[attr-defined]
            "kernels": len(mine),
            "connections": sum(k["connections"] for k in mine),
        }
        self.finish(json.dumps(model, sort_keys=True))


def access_handlers() -> list[tuple[str, type]]:
    """The URL rules of the access handlers (Jupyter Server's own patterns)."""
    session_id = r"(?P<session_id>\w+-\w+-\w+-\w+-\w+)"
    return [
        (r"/api/kernels", AccessMainKernelHandler),
        (r"/api/status", AccessAPIStatusHandler),
        (r"/api/kernelspecs", AccessMainKernelSpecHandler),
        (r"/api/sessions", AccessSessionRootHandler),
        (rf"/api/sessions/{session_id}", AccessSessionHandler),
    ]

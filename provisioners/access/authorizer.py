"""What a user may do: admins everything; others a gateway client's resources, on their own
kernels and sessions only (anyone else's answer 404, as missing ones do)."""

from __future__ import annotations

from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth import Authorizer
from tornado import web
from tornado.escape import url_unescape

from .policy import AccessError, KernelAccess

#: What a user who is not an admin may do, per Jupyter Server resource: what a gateway
#: client needs (kernels and their websockets, kernelspecs, sessions, /api/status).
#: Nothing else: no contents, terminals, config, events, nor the server's shutdown.
USER_ACTIONS: dict[str, frozenset[str]] = {
    "kernels": frozenset({"read", "write", "execute"}),
    "sessions": frozenset({"read", "write"}),
    "kernelspecs": frozenset({"read"}),
    "api": frozenset({"read"}),
}


class AccessAuthorizer(Authorizer):
    """Admins may do everything. Another user may use only :data:`USER_ACTIONS`, and on a
    request naming a kernel (``kernel_id``: its model, delete, interrupt, restart, its
    ``channels`` websocket), a session (``session_id``) or a kernelspec (``kernel_name``)
    that is not theirs to use, gets 404 as if it did not exist.

    Jupyter Server asks this before every handler marked ``@authorized`` and before a
    kernel websocket connects (``KernelWebsocketHandler.pre_get``), so the 404 comes before
    any ZMQ stream opens. Set with ``c.ServerApp.authorizer_class`` (the
    ``provisioners.access`` extension sets it when it is left at the default).
    """

    async def is_authorized(  # type: ignore[override]
        self, handler: Any, user: Any, action: str, resource: str
    ) -> bool:
        """True when allowed, False (403) for a resource beyond a user's; raises 404 for
        someone else's kernel, session or kernelspec."""
        if getattr(user, "admin", False):
            return True
        if action not in USER_ACTIONS.get(resource, frozenset()):
            self.log.info(
                "User %r may not %s %s (%s)", user.username, action, resource, handler.request.path
            )
            return False
        kwargs = getattr(handler, "path_kwargs", None) or {}
        access = KernelAccess.instance(parent=self.parent, log=self.log)
        km = handler.kernel_manager
        kernel_id = kwargs.get("kernel_id")
        if kernel_id:
            access.check_kernel(km, user, kernel_id)
        session_id = kwargs.get("session_id")
        if session_id:
            await self._check_session(handler, user, access, session_id)
        kernel_name = kwargs.get("kernel_name")
        if kernel_name and resource == "kernelspecs":
            name = url_unescape(kernel_name)
            try:
                spec = await ensure_async(handler.kernel_spec_manager.get_kernel_spec(name))
            except KeyError:
                return True  # the handler answers 404 itself
            if not access.may_use_spec(user, getattr(spec, "metadata", None)):
                raise AccessError(404, f"Kernel spec {name} not found")
        return True

    @staticmethod
    async def _check_session(handler: Any, user: Any, access: KernelAccess, sid: str) -> None:
        missing = AccessError(404, f"Session not found: session_id={sid!r}")
        try:
            model = await handler.session_manager.get_session(session_id=sid)
        except (web.HTTPError, KeyError):
            raise missing from None
        kernel_id = ((model or {}).get("kernel") or {}).get("id") or ""
        if not access.may_access(handler.kernel_manager, user, kernel_id):
            access.log.info("User %r refused session %s: not theirs", user.username, sid)
            raise missing

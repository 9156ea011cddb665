"""The ``provisioners.access`` Jupyter Server extension: one server, many users."""

from __future__ import annotations

import logging
import re
from typing import Any

from jupyter_server.auth import AllowAllAuthorizer, IdentityProvider
from jupyter_server.auth.identity import PasswordIdentityProvider
from jupyter_server.extension.application import ExtensionApp

from .authorizer import AccessAuthorizer
from .handlers import access_handlers
from .identity import AccessIdentityProvider
from .policy import KernelAccess

#: Jupyter Server's defaults, which enabling the extension replaces.
_DEFAULT_IDENTITY = (IdentityProvider, PasswordIdentityProvider)
_DEFAULT_AUTHORIZER = (AllowAllAuthorizer,)


_QUERY_TOKEN = re.compile(r"([?&]token=)[^&\s#]+")


class ScrubQueryTokens(logging.Filter):
    """Replaces ``?token=<t>`` in log records with ``?token=[secret]``: tornado logs the
    URL of a failed request (a websocket's, with its token in the query) as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _QUERY_TOKEN.sub(r"\1[secret]", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY_TOKEN.sub(r"\1[secret]", a) if isinstance(a, str) else a for a in record.args
            )
        return True


#: Loggers that may write a request's URL.
_URL_LOGGERS = ("tornado.general", "tornado.application", "tornado.access", "tornado.websocket")


class AccessExtension(ExtensionApp):
    """Identifies each request's user (:class:`AccessIdentityProvider`), lets users see and
    use only their own kernels and sessions (:class:`AccessAuthorizer` and per-user
    ``/api/kernels``, ``/api/sessions``, ``/api/kernelspecs``), and applies the
    ``KernelAccess`` settings: admins, kernelspec groups, quotas."""

    name = "provisioners.access"
    load_other_extensions = True

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        super()._link_jupyter_server_extension(serverapp)
        # Before the ServerApp makes its identity provider and authorizer.
        if serverapp.identity_provider_class in _DEFAULT_IDENTITY:
            serverapp.identity_provider_class = AccessIdentityProvider
        elif not issubclass(serverapp.identity_provider_class, AccessIdentityProvider):
            self.log.warning(
                "provisioners.access: ServerApp.identity_provider_class is %s, not "
                "AccessIdentityProvider: users are not told apart by their tokens",
                serverapp.identity_provider_class.__name__,
            )
        if serverapp.authorizer_class in _DEFAULT_AUTHORIZER:
            serverapp.authorizer_class = AccessAuthorizer
        elif not issubclass(serverapp.authorizer_class, AccessAuthorizer):
            self.log.warning(
                "provisioners.access: ServerApp.authorizer_class is %s, not AccessAuthorizer: "
                "users may reach each other's kernels",
                serverapp.authorizer_class.__name__,
            )

    def initialize_settings(self) -> None:
        serverapp: Any = self.serverapp
        access = KernelAccess.instance(parent=serverapp, log=self.log)
        sources = ["the server's token (admin)"]
        if access.token_file:
            sources.append(f"token file {access.token_file}")
        if access.hub_api_url:
            service = access.hub_service_name
            scope = f"access:services!service={service}" if service else "access:services"
            sources.append(f"JupyterHub {access.hub_api_url} (tokens with the scope {scope})")
        self.log.info("provisioners.access: users from %s", ", ".join(sources))
        for name in _URL_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, ScrubQueryTokens) for f in logger.filters):
                logger.addFilter(ScrubQueryTokens())

    def initialize_handlers(self) -> None:
        self.handlers.extend(access_handlers())

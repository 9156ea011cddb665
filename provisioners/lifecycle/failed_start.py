"""What a failed kernel start leaves to the person and to the server that asked for it.

Two things jupyter_client and Jupyter Server do not do on their own:

- the cause reaches the person: any error of a start becomes one of our named errors
  (every one of them is a tornado ``HTTPError``, see :mod:`provisioners.exceptions`),
  so ``POST /api/kernels`` answers with the engine's own words, not "Unhandled error";
- the server can still shut down: ``MultiKernelManager`` keeps a kernel whose start
  failed in its pending map forever, and Jupyter Server's ``shutdown_all`` then dies on
  it with "Kernel does not exist". :func:`forget_failed_start` drops that entry.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from ..exceptions import KernelStartError, ProvisionerError


def as_start_error(exc: Exception, *, target: str, kernel_id: str) -> ProvisionerError:
    """``exc`` itself when it is one of ours, else a :class:`KernelStartError` naming it.

    An ``OSError`` (a kernel command that cannot run) stays one: the error is also an
    instance of its class (``FileNotFoundError``...), as jupyter_client's
    LocalProvisioner raises it.
    """
    if isinstance(exc, ProvisionerError):
        if not exc.kernel_id:
            exc.kernel_id = kernel_id
        return exc
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    msg = f"{target} kernel {kernel_id} did not start: {cause}"
    if isinstance(exc, OSError):
        error = _start_error_like(type(exc))(msg, target=target, kernel_id=kernel_id)
        like = cast(OSError, error)
        like.errno, like.strerror, like.filename = exc.errno, exc.strerror, exc.filename
        return error
    return KernelStartError(msg, target=target, kernel_id=kernel_id)


#: KernelStartError classes that are also an OSError class, made once per class.
_LIKE: dict[str, type[KernelStartError]] = {}


def _start_error_like(kind: type[OSError]) -> type[KernelStartError]:
    """A :class:`KernelStartError` that is also a ``kind``."""
    name = f"KernelStart{kind.__name__}"
    if name not in _LIKE:
        _LIKE[name] = cast(type[KernelStartError], type(name, (KernelStartError, kind), {}))
    return _LIKE[name]


def forget_failed_start(kernel_manager: Any, kernel_id: str, log: logging.Logger) -> None:
    """Drop ``kernel_id`` from its multi-kernel manager's pending map after a failed start.

    Without pending kernels (Jupyter Server's default) a failed start is never added to
    the manager's kernels, but stays in ``_pending_kernels``: ``shutdown_all`` then asks
    Jupyter Server to stop a kernel it does not know, which raises "Kernel does not
    exist" and ends the server's shutdown early. With ``use_pending_kernels`` the kernel
    is listed and jupyter_client removes it itself, so it is left alone.
    """
    manager = getattr(kernel_manager, "parent", None)
    pending = getattr(manager, "_pending_kernels", None)
    kernels = getattr(manager, "_kernels", None)
    if not isinstance(pending, dict) or not isinstance(kernels, dict):
        return
    if kernel_id in kernels or kernel_id not in pending:
        return
    pending.pop(kernel_id, None)
    log.debug("Kernel %s: failed start removed from the pending kernels", kernel_id)


def exited_while_starting(code: object, where: str, log_tail: str) -> str:
    """The error text for a kernel that exited while it started: a short first line with
    the exit code (what a notebook's dialog shows first), where it ran on the next, then
    the end of the kernel's own log (or that it wrote nothing)."""
    tail = log_tail.strip() or "(the kernel wrote nothing to its log)"
    exited = "exited" if code is None else f"exited with code {code}"
    return f"The kernel {exited} while starting.\n{where}\n--- last lines of its log ---\n{tail}"

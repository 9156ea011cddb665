"""Where the Kubernetes engine runs: its own event loop (one thread per process), and
``KUBERNETES_EXECUTOR`` for its few blocking calls (the port store).

Everything of the Kubernetes target that talks to the API runs on this loop: the shared
API client (its aiohttp session), every request and websocket, the pod reflectors (the
watches that keep the pod cache current) and the port-forward listeners and relays.
Those must keep running between the caller's calls: jupyter_client's synchronous
``KernelManager`` runs its event loop only during a call (``run_sync``) and a blocking
client never runs one, so a relay on the caller's loop would stand still while the
client waits for the kernel's answer.

The loop starts lazily with its first user (:meth:`EngineLoop.hold`) and stops when the
last one lets go (:meth:`EngineLoop.release`), or at interpreter exit. A caller on any
event loop hands a coroutine over with :meth:`EngineLoop.run` (cancelling the caller
cancels it there, and waits until it has ended); the provisioner's hooks do so through
:func:`on_engine_loop`; a plain thread uses :meth:`EngineLoop.call`. Nothing blocks the
caller's loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

from ..executor import EngineExecutor
from ..loopthread import LoopThread

T = TypeVar("T")
P = ParamSpec("P")

#: The Kubernetes target's threads, for the few blocking calls it makes (the port store):
#: its API calls are asynchronous and run on the engine loop.
KUBERNETES_EXECUTOR = EngineExecutor("kubernetes", max_workers=4)

#: Name of the loop's thread (a prefix: a restarted loop gets a new thread).
THREAD_NAME = "k8s-engine-loop"


class EngineLoop(LoopThread):
    """The Kubernetes engine's loop: closes the shared API clients as it stops."""

    thread_name: ClassVar[str] = THREAD_NAME
    _current: ClassVar[LoopThread | None] = None
    _exit_hook: ClassVar[bool] = False

    async def close_resources(self) -> None:
        from .client import close_clients

        await close_clients()


class EngineUser(Protocol):
    """What :func:`on_engine_loop` needs: a way to await a coroutine on the engine loop."""

    async def _on_engine(self, coro: Coroutine[Any, Any, T]) -> T: ...


U = TypeVar("U", bound=EngineUser)


def on_engine_loop(
    method: Callable[Concatenate[U, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[U, P], Coroutine[Any, Any, T]]:
    """Run the decorated (provisioner hook) coroutine on the engine loop, whatever loop
    the caller (jupyter_client, sync or async) awaits it from."""

    @functools.wraps(method)
    async def on_engine(self: U, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._on_engine(method(self, *args, **kwargs))

    return on_engine

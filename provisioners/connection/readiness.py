"""Whether a kernel is ready, reached the way its clients reach it: written once.

Two checks, one module. :func:`wait_until_listening` is the start's probe: it repeats an
engine's own cheap test (a channel speaking ZMTP, directly, through SSH or through a
port-forward) and, between tries, asks the engine why the start may be failing, so a
dead container or an unschedulable pod fails the start at once, in the engine's words.
:func:`wait_until_answering` is the protocol check for warm kernels and restarts, and
:func:`announce_state` asks a running kernel to publish its state once.

A client's iopub socket only gets what the kernel publishes after the client's
subscription has reached the kernel: a status published earlier is lost. Jupyter
Server checks this with repeated ``kernel_info_request`` s when a websocket opens; a
restarted kernel gets no such check for the sockets that were open before, so a
provisioner reports a restart done only after :func:`wait_until_answering`.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

__all__ = [
    "IOPUB_AFTER_REPLY",
    "SUBSCRIBER_RECONNECT",
    "announce_state",
    "wait_until_answering",
    "wait_until_listening",
]

#: Longest a subscriber with libzmq's default reconnect settings waits between two
#: connection attempts (``ZMQ_RECONNECT_IVL`` of 100 ms plus a jitter of up to as much),
#: with a margin.
SUBSCRIBER_RECONNECT = 0.3
#: Longest wait for an iopub status once the kernel has answered on its shell channel
#: (Jupyter Server's own check waits for both too; a kernel that never publishes one
#: does not hold a restart for the whole ``launch_timeout``).
IOPUB_AFTER_REPLY = 10.0
#: First interval between two requests; it doubles up to :data:`_RETRY_MAX`.
_RETRY_FIRST = 0.2
_RETRY_MAX = 1.0
_POLL = 0.05


async def wait_until_listening(
    listening: Callable[[], Awaitable[bool]],
    check_start: Callable[[], Awaitable[None]],
    *,
    interval: float = 0.05,
    check_every: float = 0.5,
    first_check: float = 0.3,
) -> None:
    """Return once ``listening()`` is True; every ``check_every`` seconds (the first after
    ``first_check``) await ``check_start()``, which raises the engine's named error when
    the start is failing (the kernel exited, the pod cannot be scheduled).

    No timeout of its own: the lifecycle bounds the whole start by ``launch_timeout``.
    Errors of either callable propagate.
    """
    next_check = time.monotonic() + first_check
    while True:
        if time.monotonic() >= next_check:
            await check_start()
            next_check = time.monotonic() + check_every
        if await listening():
            return
        await asyncio.sleep(interval)


async def wait_until_answering(info: Any, timeout: float) -> None:
    """Return once the kernel at ``info`` answers a ``kernel_info_request`` on its shell
    channel and publishes a status for one to this client's subscriber.

    Requests repeat, at growing intervals, until both arrive. Raises :class:`TimeoutError`
    after ``timeout`` seconds, or :data:`IOPUB_AFTER_REPLY` seconds after the first reply
    when no status came; connection errors of the client propagate.
    """
    client = AsyncKernelClient()
    client.load_connection_info(info)
    client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    sent: set[str] = set()
    replied = published = False
    try:
        deadline = time.monotonic() + timeout
        retry = _RETRY_FIRST
        while True:
            sent.add(client.kernel_info())
            resend_at = min(deadline, time.monotonic() + retry)
            retry = min(retry * 2, _RETRY_MAX)
            while time.monotonic() < resend_at:
                if not replied and await _got_answer(client.get_shell_msg, sent):
                    replied = True
                    deadline = min(deadline, time.monotonic() + IOPUB_AFTER_REPLY)
                published = published or await _got_answer(client.get_iopub_msg, sent)
                if replied and published:
                    return
            if time.monotonic() >= deadline:
                if replied:
                    msg = f"the kernel answered but published no status for {IOPUB_AFTER_REPLY:g} s"
                else:
                    msg = f"the kernel sent no kernel_info reply within {timeout:g} s"
                raise TimeoutError(msg)
    finally:
        client.stop_channels()
        client.context.destroy(linger=0)


async def _got_answer(get_msg: Any, sent: set[str]) -> bool:
    """Whether the next message on a channel (within a short poll) answers one of ``sent``."""
    try:
        msg = await get_msg(timeout=_POLL)
    except queue.Empty:
        return False
    return msg.get("parent_header", {}).get("msg_id") in sent


async def announce_state(info: Any, timeout: float = 2.0) -> bool:
    """Send the kernel at ``info`` one ``kernel_info_request`` on a shell socket of its
    own and wait for the reply: while it answers, the kernel publishes its state (busy,
    then idle) to every subscriber of its iopub. Returns whether it replied within
    ``timeout``; connection errors of the client propagate."""
    client = AsyncKernelClient()
    client.load_connection_info(info)
    client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
    try:
        sent = {client.kernel_info()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await _got_answer(client.get_shell_msg, sent):
                return True
        return False
    finally:
        client.stop_channels()
        client.context.destroy(linger=0)

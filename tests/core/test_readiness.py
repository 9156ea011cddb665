"""``wait_until_answering``: what a restart that keeps its ports waits for before it is
reported done (a kernel_info reply and an iopub status), and its two time limits."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import zmq
import zmq.asyncio
from jupyter_client.manager import start_new_async_kernel
from jupyter_client.session import Session

from provisioners.connection import readiness
from provisioners.connection.readiness import wait_until_answering
from tests.jupyter_server import free_port


async def test_a_real_kernel_answers_on_shell_and_iopub() -> None:
    km, kc = await start_new_async_kernel(kernel_name="python3")
    try:
        kc.stop_channels()
        await wait_until_answering(km.get_connection_info(), 30)
    finally:
        await km.shutdown_kernel(now=True)


async def test_nothing_listening_times_out_naming_the_missing_reply() -> None:
    info = _info()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no kernel_info reply within 1 s"):
        await wait_until_answering(info, 1)
    assert time.monotonic() - started < 5


async def test_a_kernel_that_answers_but_never_publishes_is_not_waited_for_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel that replies on shell but publishes no status: the wait ends
    ``IOPUB_AFTER_REPLY`` after the reply, not at the (long) timeout."""
    monkeypatch.setattr(readiness, "IOPUB_AFTER_REPLY", 1.0)
    info = _info()
    session = Session(key=info["key"], signature_scheme=info["signature_scheme"])
    context = zmq.asyncio.Context()
    shell = context.socket(zmq.ROUTER)
    shell.bind(f"tcp://127.0.0.1:{info['shell_port']}")
    iopub = context.socket(zmq.PUB)  # bound, silent
    iopub.bind(f"tcp://127.0.0.1:{info['iopub_port']}")

    async def answer_on_shell() -> None:
        while True:
            idents, msg = session.feed_identities(await shell.recv_multipart())
            request = session.deserialize(msg)
            session.send(shell, "kernel_info_reply", {"status": "ok"}, request, ident=idents)

    server = asyncio.create_task(answer_on_shell())
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="answered but published no status for 1 s"):
            await wait_until_answering(info, 60)
        assert time.monotonic() - started < 10
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        context.destroy(linger=0)


def _info() -> dict[str, Any]:
    """Connection info on free loopback ports, with a fresh key."""
    names = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
    return {
        **{name: free_port() for name in names},
        "ip": "127.0.0.1",
        "transport": "tcp",
        "key": uuid.uuid4().hex.encode(),
        "signature_scheme": "hmac-sha256",
    }

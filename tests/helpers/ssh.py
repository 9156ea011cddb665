"""Helpers of the SSH tests: tunnel threads, processes, a kernel used on all channels."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import paramiko
import zmq
from jupyter_client.asynchronous import AsyncKernelClient

from provisioners.connection.sshlink import THREAD_PREFIX


def tunnel_threads() -> list[threading.Thread]:
    """Our acceptor/relay threads and paramiko transport threads still alive."""
    return [
        t
        for t in threading.enumerate()
        if t.is_alive() and (t.name.startswith(THREAD_PREFIX) or isinstance(t, paramiko.Transport))
    ]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def execute_info(info: dict[str, Any], code: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``code`` through a client of ``info`` and use all five channels on the way:
    kernel_info over control, a ping on the heartbeat, ``input()`` answered over stdin."""
    kc = AsyncKernelClient()
    kc.load_connection_info(info)
    # Without a kernel manager the client judges liveness by the heartbeat, whose first
    # verdict comes after time_to_dead: leave a kernel still starting up time to bind.
    kc.hb_channel.time_to_dead = 10.0
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=timeout)
        request = kc.session.msg("kernel_info_request")
        kc.control_channel.send(request)
        reply = await kc.control_channel.get_msg(timeout=timeout)
        assert reply["parent_header"]["msg_id"] == request["header"]["msg_id"]
        assert reply["msg_type"] == "kernel_info_reply"
        heartbeat = kc.context.socket(zmq.REQ)
        heartbeat.linger = 0
        try:
            heartbeat.connect(f"tcp://{info['ip']}:{info['hb_port']}")
            await heartbeat.send(b"ping")
            assert await asyncio.wait_for(heartbeat.recv(), timeout) == b"ping"
        finally:
            heartbeat.close()
        out: dict[str, Any] = {"stdout": "", "error": None}

        def on_output(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out["stdout"] += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                out["error"] = msg["content"]["ename"]

        def on_input(msg: dict[str, Any]) -> None:
            kc.input("through stdin")

        reply = await kc.execute_interactive(
            code, timeout=timeout, output_hook=on_output, stdin_hook=on_input, allow_stdin=True
        )
        out["status"] = reply["content"]["status"]
        return out
    finally:
        kc.stop_channels()

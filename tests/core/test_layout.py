"""The shared connection layer stays small and apart: every module under 600 lines, its
public SSH names importable where they always were, and no engine on asyncio's default
executor."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "provisioners"
MAX_LINES = 600


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "connection").glob("*.py")), ids=lambda p: p.name
)
def test_connection_modules_stay_under_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by responsibility"


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            "provisioners.connection.sshlink",
            [
                "SSHLink",
                "SSHSettings",
                "CommandResult",
                "parse_server",
                "format_server",
                "ENV_KNOWN_HOSTS",
                "ENV_ACCEPT_UNKNOWN",
                "ENV_CONNECT_TIMEOUT",
                "THREAD_PREFIX",
                "SSH_EXECUTOR",
            ],
        ),
        (
            "provisioners.connection.tunnels",
            [
                "KERNEL_PORT_NAMES",
                "ForwardServer",
                "KernelTunnels",
                "TunnelPorts",
                "TunnelProcess",
                "forward_tunnel",
                "ssh_tunnel",
                "tunnel_to_kernel",
            ],
        ),
    ],
)
def test_public_ssh_names_stay_importable(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert [n for n in names if not hasattr(imported, n)] == []
    assert set(names) <= set(imported.__all__)


def test_no_engine_call_uses_the_default_executor() -> None:
    """Blocking engine calls go to their engine's EngineExecutor (provisioners.executor)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            default_pool = name == "run_in_executor" and (
                not node.args
                or (isinstance(node.args[0], ast.Constant) and node.args[0].value is None)
            )
            if name == "to_thread" or default_pool:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []

"""Start progress: INFO lines in the server's log, and live on ``run``'s stderr, per target."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioners.progress import RECORD_ATTRIBUTE, ProgressStep
from tests.helpers import cli_env, write_kernelspec
from tests.targets import TargetCase

#: Steps each target reports, besides the base's "starting" and "ready".
ENGINE_STEPS = {
    "local": [],
    "docker": ["container created", "container started"],
    "ssh": ["kernel directory created", "uploaded", "kernel process started", "tunnels open"],
    "kubernetes": ["pod created", "pod running"],
}


def _spec_dir(tmp_path: Path, target: TargetCase) -> Path:
    kernels = tmp_path / "kernels"
    write_kernelspec(kernels, "progress", target.provisioner, target.config, argv=target.argv)
    return kernels


def _run(kernels: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "provisioners", "run", "--kernel-dir", str(kernels),
        "--kernel", "progress", *extra, "-c", "print(6 * 7)",
    ]  # fmt: skip


async def test_start_steps_are_logged_at_info(
    target: TargetCase, kernel_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each step is one INFO line with the kernel id, the engine's words and the elapsed
    time; the HMAC key is in none of them."""
    km = kernel_manager(target.provisioner, **target.spec())
    caplog.set_level(logging.INFO)
    await km.start_kernel()
    try:
        steps = [
            (r, getattr(r, RECORD_ATTRIBUTE))
            for r in caplog.records
            if isinstance(getattr(r, RECORD_ATTRIBUTE, None), ProgressStep)
        ]
        names = [step.step for _, step in steps]
        assert names[0] == "starting" and names[-1] == "ready", names
        for expected in ENGINE_STEPS[target.name]:
            assert expected in names, f"{target.name}: no {expected!r} step in {names}"
        elapsed = [step.elapsed for _, step in steps]
        assert elapsed == sorted(elapsed)
        key = km.session.key.decode()
        for record, step in steps:
            assert record.levelno == logging.INFO
            message = record.getMessage()
            assert km.kernel_id in message and f"[{step.elapsed:.1f} s]" in message
            assert step.target in message
        assert not [r for r in caplog.records if key in r.getMessage()]
    finally:
        await km.shutdown_kernel()


def test_run_shows_steps_then_output(target: TargetCase, tmp_path: Path) -> None:
    """Not on a terminal: one plain line per step on stderr, then the kernel's output."""
    result = subprocess.run(
        _run(_spec_dir(tmp_path, target)),
        capture_output=True, text=True, timeout=240, env=cli_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    lines = [line for line in result.stderr.splitlines() if " kernel: " in line]
    shown = [line.split(" kernel: ", 1)[1].split(":", 1)[0] for line in lines]
    assert shown[0] == "starting" and shown[-1] == "ready", result.stderr
    for expected in ENGINE_STEPS[target.name]:
        assert expected in shown, result.stderr
    assert all(line.startswith("[") and " s] " in line for line in lines)
    assert "\r" not in result.stderr


def test_run_quiet_shows_no_steps(tmp_path: Path) -> None:
    from tests.targets import local_case

    result = subprocess.run(
        _run(_spec_dir(tmp_path, local_case()), "--quiet"),
        capture_output=True, text=True, timeout=120, env=cli_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    assert " kernel: " not in result.stderr


def test_run_on_a_terminal_draws_a_status_line(tmp_path: Path) -> None:
    """On a terminal the steps replace each other on one status line with a spinner, and
    the line is cleared before the kernel's output."""
    from tests.targets import local_case

    command = _run(_spec_dir(tmp_path, local_case()))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=cli_env()
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0, output
    os.close(leader)
    text = output.decode(errors="replace")
    assert "\r\x1b[2K" in text, text
    assert "local kernel: starting" in text and "local kernel: ready" in text
    assert "42" in text.split("local kernel: ready", 1)[1]
    plain = [line for line in text.split("\n") if line.startswith("[") and "kernel: " in line]
    assert not plain, "steps printed as plain lines on a terminal"

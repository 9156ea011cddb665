"""Start progress: one INFO log line per step, and a renderer for a person at a terminal.

A provisioner reports each step of a start (an image pull, a pod scheduled, a kernel
answering) through :meth:`ClusterProvisioner.progress`, which logs it at INFO in the
server's log with the kernel id, the engine's own words and the elapsed time. The record
also carries the step as data (``record.kernel_progress``, a :class:`ProgressStep`), so
that a front end such as ``jupyter-provisioners run`` can show it live without parsing
text. The HMAC key never reaches a step: steps carry engine messages, never connection
info.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

#: Attribute of a :class:`logging.LogRecord` that holds its :class:`ProgressStep`.
RECORD_ATTRIBUTE = "kernel_progress"
_SPINNER = "|/-\\"


@dataclass(frozen=True)
class ProgressStep:
    """One step of a kernel start, as the engine reported it."""

    kernel_id: str
    target: str
    step: str
    detail: str
    elapsed: float

    def describe(self) -> str:
        """``step: detail`` in one line, the way the log and the terminal show it."""
        text = f"{self.step}: {self.detail}" if self.detail else self.step
        return " ".join(text.split())


def log_step(log: logging.Logger | logging.LoggerAdapter[Any], step: ProgressStep) -> None:
    """Log ``step`` at INFO with the kernel id, the target and the elapsed time."""
    log.info(
        "Kernel %s (%s): %s [%.1f s]",
        step.kernel_id,
        step.target,
        step.describe(),
        step.elapsed,
        extra={RECORD_ATTRIBUTE: step},
    )


class ProgressRenderer(logging.Handler):
    """Shows start steps on a stream: a status line with a spinner on a terminal, plain
    lines otherwise. Other records at WARNING and above are printed as they come."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        super().__init__(logging.INFO)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._status = ""
        self._lock_line = threading.Lock()
        self._spinner = itertools.cycle(_SPINNER)
        self._ticker: threading.Thread | None = None
        self._stopped = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        step = getattr(record, RECORD_ATTRIBUTE, None)
        if isinstance(step, ProgressStep):
            line = f"[{step.elapsed:5.1f} s] {step.target} kernel: {step.describe()}"
            if self.live:
                with self._lock_line:
                    self._status = line
                self._draw()
                self._start_ticker()
            else:
                self._write(line + "\n")
        elif record.levelno >= logging.WARNING:
            self._write(f"{record.levelname.lower()}: {record.getMessage()}\n")

    def finish(self) -> None:
        """Clear the status line (on a terminal) before the kernel's own output."""
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        if self.live:
            with self._lock_line:
                if self._status:
                    self.stream.write("\r\x1b[2K")
                    self.stream.flush()
                self._status = ""

    def close(self) -> None:
        self.finish()
        super().close()

    def _write(self, text: str) -> None:
        with self._lock_line:
            if self.live and self._status:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text)
            if self.live and self._status:
                self.stream.write(self._status_text())
            self.stream.flush()

    def _draw(self) -> None:
        with self._lock_line:
            if self._status:
                self.stream.write("\r\x1b[2K" + self._status_text())
                self.stream.flush()

    def _status_text(self) -> str:
        return f"{next(self._spinner)} {self._status}"

    def _start_ticker(self) -> None:
        if self._ticker is not None:
            return

        def tick() -> None:
            while not self._stopped.wait(0.15):
                self._draw()

        self._ticker = threading.Thread(target=tick, name="progress-spinner", daemon=True)
        self._ticker.start()

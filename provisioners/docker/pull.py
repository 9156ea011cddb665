"""Image pulls with progress: the daemon's pull stream summed up in lines a person reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker

#: Seconds between two progress lines while bytes are still coming.
PROGRESS_INTERVAL = 1.0
_DONE = {"Pull complete", "Already exists"}


class PullProgress:
    """Sums a Docker pull stream into ``"2/5 layers done, 41.0 of 120.3 MB"`` lines."""

    def __init__(self, image: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.image = image
        self.layers: dict[str, tuple[int, int]] = {}
        self.done: set[str] = set()
        self._clock = clock
        self._last_line = ""
        self._last_time = float("-inf")

    def update(self, event: dict[str, Any]) -> str:
        """Take one event of the stream; return a line to show, or "" for nothing new.

        Raises :class:`docker.errors.APIError` for an ``error`` event (a failed pull).
        """
        if event.get("error"):
            raise docker.errors.APIError(str(event.get("error")))
        status, layer = str(event.get("status", "")), str(event.get("id", ""))
        detail = event.get("progressDetail") or {}
        if layer and status in ("Pulling fs layer", "Waiting"):
            self.layers.setdefault(layer, (0, 0))
        elif layer and status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
        elif layer and status in _DONE:
            self.layers.setdefault(layer, (0, 0))
            self.done.add(layer)
        elif not layer and status.startswith(("Digest:", "Status:")):
            return self._emit(status, force=True)
        else:
            return ""
        return self._emit(self.summary(), force=status in _DONE)

    def summary(self) -> str:
        """Layers done and bytes downloaded so far."""
        text = f"{len(self.done)}/{len(self.layers)} layers done"
        current = sum(c for c, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        if total:
            text += f", {current / 1e6:.1f} of {total / 1e6:.1f} MB"
        return text

    def _emit(self, line: str, *, force: bool) -> str:
        now = self._clock()
        if line == self._last_line or (not force and now - self._last_time < PROGRESS_INTERVAL):
            return ""
        self._last_line, self._last_time = line, now
        return line


def stream_pull(
    client: docker.DockerClient,
    repository: str,
    tag: str,
    on_event: Callable[[dict[str, Any]], None],
) -> None:
    """Pull ``repository:tag``, handing every event of the daemon's stream to ``on_event``.

    Blocking: run it in a thread. Raises :class:`docker.errors.APIError` when the pull
    fails, also when the daemon reports the failure inside the stream.
    """
    for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
        on_event(event)

"""Fixtures of the e2e tests (run through e2e/run.sh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.helpers import Forward


@pytest.fixture
def forward() -> Iterator[Forward]:
    fwd = Forward()
    fwd.start()
    fwd.watch()
    try:
        yield fwd
    finally:
        fwd.watching = False
        fwd.thread.join(10)
        fwd.stop()

"""Fixtures of the Helm chart tests.

These tests look at rendered YAML only: they never import the ``provisioners`` package, so
they run (and must pass) even while the package itself is broken or half written.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def jupyter_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Replaces the suite-wide fixture of the same name, which imports ``provisioners``."""
    runtime = tmp_path_factory.mktemp("runtime")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(runtime))
    return runtime

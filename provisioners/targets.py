"""The targets the CLI knows: their entry points, and how to list and sweep their kernels."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


async def _nothing() -> list[Any]:
    return []


@dataclass(frozen=True)
class Target:
    """One engine: its provisioner class and its CLI hooks (each returns a list)."""

    entry_point: str
    class_path: str
    list_kernels: Callable[[], Awaitable[list[dict[str, Any]]]] = _nothing
    sweep: Callable[[], Awaitable[list[str]]] = _nothing


TARGETS: dict[str, Target] = {
    "local": Target("cluster-local-provisioner", "provisioners.local:LocalClusterProvisioner"),
}


def load_target(name: str) -> Any:
    """The provisioner class of target ``name``."""
    module, _, attr = TARGETS[name].class_path.partition(":")
    return getattr(importlib.import_module(module), attr)

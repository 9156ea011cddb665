"""Hostile launch parameter values on every target: each is refused naming its parameter,
before anything runs, or (a free-text parameter) reaches the kernel as literal data."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.parameters import LaunchBounds, LaunchParameterError
from tests.helpers import count, execute
from tests.targets import TargetCase, resolve

_MARK = uuid.uuid4().hex[:8]
PWNED = f"/tmp/cp-param-pwned-{_MARK}"
#: Parameters every target honours (they reach the kernel as KERNEL_<NAME>).
SCHEMA: dict[str, Any] = {
    "threads": {"type": "integer", "minimum": 1, "maximum": 8, "default": 2},
    "ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
    "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
    "label": {"type": "string", "pattern": "[a-z0-9-]{1,20}", "default": "run"},
    "note": {"type": "string", "default": ""},
    "debug": {"type": "boolean", "default": False},
}
#: The resource parameters, where the target honours them (Docker, Kubernetes).
RESOURCES: dict[str, Any] = {
    "cpu": {"type": "number", "minimum": 0.1, "maximum": 1, "default": 0.5},
    "memory": {"type": "string", "minimum": "64Mi", "maximum": "1Gi", "default": "512Mi"},
    "gpus": {"type": "integer", "minimum": 0, "maximum": 0, "default": 0},
}
HOSTILE = [
    ("threads", "8; touch " + PWNED),
    ("threads", "$(touch " + PWNED + ")"),
    ("threads", "1e400"),
    ("threads", "-1"),
    ("threads", "٣"),
    ("ratio", "nan"),
    ("ratio", "inf"),
    ("ratio", "1e309"),
    ("ratio", "0x1"),
    ("mode", "fast\n---\nkind: Pod"),
    ("mode", "FAST"),
    ("label", "../../etc/passwd"),
    ("label", "`touch " + PWNED + "`"),
    ("note", "line one\nline two"),
    ("note", "nul\x00byte"),
    ("note", "A" * 10_000),
    ("debug", "yes; id"),
    ("cpu", "2; rm -rf /"),
    ("cpu", "-1"),
    ("cpu", "1e309"),
    ("memory", "9999Ti"),
    ("memory", "1Gi "),
    ("memory", "64Mi\n---"),
    ("gpus", "1"),
]
#: A free-text value that is allowed: it must reach the kernel unchanged and run nothing.
LITERAL = (
    f'it\'s "quoted" $(touch {PWNED}) `touch {PWNED}` x; touch {PWNED} {{x}} héllo '
    "$(KERNEL_MODE) $$ ${HOME}"
)


def schema_for(target: TargetCase) -> dict[str, Any]:
    honours = target.name in ("docker", "kubernetes")
    return {**SCHEMA, **(RESOURCES if honours else {})}


@pytest.fixture(autouse=True)
def fresh_bounds() -> Iterator[None]:
    LaunchBounds.clear_instance()
    yield
    LaunchBounds.clear_instance()


async def test_hostile_parameter_values_are_refused_by_name(
    kernel_manager: Any, target: TargetCase
) -> None:
    schema = schema_for(target)
    tried = 0
    for name, value in HOSTILE:
        if name not in schema:
            continue
        km = kernel_manager(
            target.provisioner,
            **target.spec(),
            metadata={"parameters": schema},
            name=f"hostile-params-{target.name}",
        )
        with pytest.raises(LaunchParameterError) as caught:
            await km.start_kernel(env={**os.environ, f"KERNEL_{name.upper()}": value})
        assert caught.value.parameter == name, (name, value, str(caught.value))
        assert len(str(caught.value)) < 400
        assert not km.has_kernel and ClusterPortCache.instance().held() == {}
        assert await resolve(target.leftovers(km.kernel_id)) == []
        tried += 1
    count("hostile parameter values refused", target.name, tried)
    assert not Path(PWNED).exists()


async def test_allowed_parameter_values_reach_the_kernel_as_literal_data(
    kernel_manager: Any, target: TargetCase
) -> None:
    km = kernel_manager(
        target.provisioner,
        **target.spec(),
        metadata={"parameters": schema_for(target)},
        name=f"literal-params-{target.name}",
    )
    env = {"KERNEL_NOTE": LITERAL, "KERNEL_THREADS": "+3", "KERNEL_DEBUG": "TRUE"}
    await km.start_kernel(env={**os.environ, **env})
    try:
        code = (
            "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
            "('KERNEL_NOTE', 'KERNEL_THREADS', 'KERNEL_DEBUG', 'KERNEL_MODE', 'KERNEL_LABEL')}))"
        )
        seen = json.loads((await execute(km, code))["stdout"])
        # values reach the kernel as the schema reads them; defaults are exported
        assert seen == {
            "KERNEL_NOTE": LITERAL,
            "KERNEL_THREADS": "3",  # as the schema reads them
            "KERNEL_DEBUG": "true",
            "KERNEL_MODE": "fast",
            "KERNEL_LABEL": "run",
        }
        count("hostile parameter values passed literally", target.name)
    finally:
        await km.shutdown_kernel()
    assert not Path(PWNED).exists(), "a parameter value was executed by a shell"

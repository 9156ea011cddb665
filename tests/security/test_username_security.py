"""Hostile user names on every target that expands ``{username}`` (Docker, SSH, Kubernetes):
each is mapped to a safe segment where a setting puts it, reaches the kernel literally as
``KERNEL_USERNAME``, and never makes an engine object's name unsafe; a name no environment
can hold is refused by name, and nothing is left behind."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest

from provisioners.usernames import UsernameError, path_segment
from tests.helpers import count, execute
from tests.targets import TargetCase, resolve

PER_USER_TARGETS = ["docker", "ssh", "kubernetes"]
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SAFE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
PWNED = f"/tmp/cp-pwned-user-{uuid.uuid4().hex[:8]}"
HOSTILE_USERNAMES = {
    "traversal": "../../etc/passwd",
    "dns_invalid": "Alice_B.example",
    "unicode_rtl": "jürgen\u202e🐍",
    "shell": f"$(touch {PWNED}); `touch {PWNED}`",
    "yaml": "x\n---\nkind: Pod\nmetadata:\n  name: injected-pod\n",
    "long": "u" * 300,
}


@pytest.mark.parametrize("target", PER_USER_TARGETS, indirect=True)
async def test_hostile_usernames_are_mapped_safely_on_every_target(
    kernel_manager, target: TargetCase
) -> None:
    config_env = {"WHO": "{username}", "DATA": "/data/{username}/x"}
    for label, name in HOSTILE_USERNAMES.items():
        km = kernel_manager(
            target.provisioner,
            **target.spec(env=config_env),
            name=f"user-{target.name}-{label.replace('_', '-')}",
        )
        await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": name})
        try:
            code = (
                "import os, json; print(json.dumps([os.environ[k] for k in "
                "('KERNEL_USERNAME', 'WHO', 'DATA')]))"
            )
            out = await execute(km, code)
            raw, who, data = json.loads(out["stdout"])
            assert raw == name  # the exact name, as data
            assert who == path_segment(name) and SAFE_SEGMENT.fullmatch(who), who
            assert data == f"/data/{who}/x" and os.path.normpath(data) == data
            for obj in await resolve(target.names(km)):
                assert SAFE_NAME.fullmatch(obj), f"unsafe {target.name} object name {obj!r}"
            count("hostile usernames tried", target.name)
        finally:
            await km.shutdown_kernel()
    assert not Path(PWNED).exists(), "a user name was executed by a shell"


@pytest.mark.parametrize("target", PER_USER_TARGETS, indirect=True)
async def test_unusable_usernames_are_refused_by_name_leaving_nothing(
    kernel_manager, target: TargetCase
) -> None:
    km = kernel_manager(target.provisioner, **target.spec(env={"WHO": "{username}"}))
    for env, words in (
        ({"KERNEL_USERNAME": "a\x00b"}, "KERNEL_USERNAME contains a NUL"),
        ({}, "setting 'env.WHO' uses {username}"),
    ):
        kernel_id = str(uuid.uuid4())
        with pytest.raises(UsernameError, match=re.escape(words)):
            await km.start_kernel(kernel_id=kernel_id, env=env)
        assert not km.has_kernel
        assert await resolve(target.leftovers(kernel_id)) == []
        count("hostile usernames tried", target.name)


@pytest.mark.parametrize("target", ["local"], indirect=True)
async def test_a_nul_username_is_refused_on_the_local_target_too(
    kernel_manager, target: TargetCase
) -> None:
    km = kernel_manager(target.provisioner, **target.spec())
    kernel_id = str(uuid.uuid4())
    with pytest.raises(UsernameError, match="KERNEL_USERNAME contains a NUL"):
        await km.start_kernel(kernel_id=kernel_id, env={**os.environ, "KERNEL_USERNAME": "a\x00b"})
    assert not km.has_kernel
    assert await resolve(target.leftovers(kernel_id)) == []

"""What a kernel may see and what input may do, on every target.

Each test runs once per target (``target``, tests/engine_fixtures.py). Counts of the cases tried are
collected by ``tests/security/summary.py`` and printed at the end of the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import uuid
from pathlib import Path

import pytest

from provisioners.connection.ports import ClusterPortCache
from provisioners.exceptions import ProvisionerConfigError
from tests.helpers import count, execute
from tests.targets import TargetCase, resolve

SERVER_SECRETS = {
    "JUPYTER_TOKEN": "server-token-do-not-leak",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-do-not-leak",
    # KERNEL_* only from the start request, never from the server's own environment
    "KERNEL_SERVER_SECRET": "server-kernel-var-do-not-leak",
}

_MARK = uuid.uuid4().hex[:8]
PWNED = f"/tmp/cp-pwned-{_MARK}"
HOSTILE_VALUES = {
    "quotes": "it's a \"quoted\" 'value'",
    "command_substitution": f"$(touch {PWNED})",
    "backticks": f"`touch {PWNED}`",
    "semicolon": f"x; touch {PWNED}; echo",
    "newlines": "line one\nline two\r\nline three",
    "yaml_document": "x\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: injected-pod\n",
    "templates": "{{ .Values.secret }} ${HOME} %(name)s {connection_file}",
    "unicode": "héllo wörld ✓ 日本語 \u202e",
    "long": "A" * 10_000,
}
#: DNS-1123-style names and label values: what every engine object name must stay within.
SAFE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
HOSTILE_KERNEL_IDS = [
    "../../etc/passwd",
    "a b",
    "$(id)",
    "`id`",
    "x;rm -rf /",
    "k\n---\nkind: Pod",
    "x" * 200,
    "{{ x }}",
    "ünïcode",
    "",
]


async def test_server_environment_never_reaches_the_kernel(
    kernel_manager, target: TargetCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    km = kernel_manager(target.provisioner, **target.spec(), env={"FROM_SPEC": "spec-value"})
    # jupyter_server passes the server's environment plus the request's KERNEL_* values
    await km.start_kernel(env={**os.environ, "KERNEL_USERNAME": "alice"})
    try:
        out = await execute(km, "import os, json; print(json.dumps(dict(os.environ)))")
        kernel_env = json.loads(out["stdout"])
        for name in SERVER_SECRETS:
            assert name not in kernel_env, f"{name} leaked into the {target.name} kernel"
        count("server env leaks checked", target.name, len(SERVER_SECRETS))
        assert kernel_env["KERNEL_USERNAME"] == "alice"
        assert kernel_env["FROM_SPEC"] == "spec-value"
    finally:
        await km.shutdown_kernel()


async def test_hmac_key_only_in_the_connection_file(
    kernel_manager, target: TargetCase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("traitlets", "provisioners", "docker", "paramiko", "kubernetes_asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    km = kernel_manager(target.provisioner, **target.spec())
    await km.start_kernel()
    key = km.session.key.decode()
    try:
        assert (await execute(km, "print('up')"))["stdout"] == "up\n"
        shown = await resolve(target.inspect(km))
        assert shown and key not in shown, f"the key shows in the {target.name} engine"
        await km.restart_kernel()
        assert (await execute(km, "print('again')"))["stdout"] == "again\n"
        assert key not in await resolve(target.inspect(km))
    finally:
        await km.shutdown_kernel()
    assert key not in caplog.text, "the HMAC key was logged"
    assert len(caplog.records) > 0  # the capture did see the lifecycle's log lines


async def test_runtime_files_are_private(
    kernel_manager, target: TargetCase, jupyter_dirs: Path
) -> None:
    km = kernel_manager(target.provisioner, **target.spec())
    await km.start_kernel()
    try:
        await execute(km, "1")
        paths = list(jupyter_dirs.rglob("*"))
        assert any(p.suffix == ".json" for p in paths)
        for path in [jupyter_dirs, *paths]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}: readable by others"
    finally:
        await km.shutdown_kernel()


async def test_hostile_values_reach_the_kernel_as_literal_data(
    kernel_manager, target: TargetCase
) -> None:
    env = {f"KERNEL_HOSTILE_{name.upper()}": value for name, value in HOSTILE_VALUES.items()}
    # user names reach labels, annotations and paths on some engines
    env["KERNEL_USERNAME"] = HOSTILE_VALUES["yaml_document"] + HOSTILE_VALUES["semicolon"] * 20
    config_env = {f"CONFIG_HOSTILE_{name.upper()}": v for name, v in HOSTILE_VALUES.items()}
    km = kernel_manager(
        target.provisioner, **target.spec(env=config_env), name=f"hostile-{target.name}"
    )
    await km.start_kernel(env={**os.environ, **env})
    try:
        code = (
            "import os, json; print(json.dumps({k: v for k, v in os.environ.items() "
            "if 'HOSTILE' in k}))"
        )
        code = code.replace("'HOSTILE' in k", "'HOSTILE' in k or k == 'KERNEL_USERNAME'")
        seen = json.loads((await execute(km, code))["stdout"])
        assert seen == {**env, **config_env}
        for name in await resolve(target.names(km)):
            assert SAFE_NAME.fullmatch(name), f"unsafe {target.name} object name {name!r}"
            assert "injected-pod" not in name
        count("hostile inputs tried", target.name, len(env) + len(config_env))
    finally:
        await km.shutdown_kernel()
    assert not Path(PWNED).exists(), "a hostile value was executed by a shell"


@pytest.mark.parametrize("kernel_id", HOSTILE_KERNEL_IDS, ids=range(len(HOSTILE_KERNEL_IDS)))
async def test_hostile_kernel_ids_are_refused(
    kernel_manager, target: TargetCase, kernel_id: str
) -> None:
    km = kernel_manager(target.provisioner, **target.spec())
    with pytest.raises(ProvisionerConfigError) as info:
        await km.start_kernel(kernel_id=kernel_id or "")
    assert info.value.key == "kernel_id"
    count("hostile inputs tried", target.name)
    assert not km.has_kernel
    assert ClusterPortCache.instance().held() == {}


@pytest.mark.parametrize(
    "config",
    [{"no_such_setting": 1}, {"launch_timeout": "never"}, {"port_range": "99999-1"}],
    ids=["unknown-key", "wrong-type", "bad-range"],
)
async def test_wrong_provisioner_config_starts_nothing(
    kernel_manager, target: TargetCase, config: dict
) -> None:
    km = kernel_manager(target.provisioner, **target.spec(**config), name="wrongcfg")
    with pytest.raises(ProvisionerConfigError) as info:
        await km.start_kernel()
    assert next(iter(config)) in str(info.value) and "wrongcfg" in str(info.value)
    count("hostile inputs tried", target.name)
    assert not km.has_kernel
    assert ClusterPortCache.instance().held() == {}

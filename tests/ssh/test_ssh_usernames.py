"""``{username}`` in SSH kernels against a real sshd: a working directory per user (hostile
names mapped to one safe segment under it), env per user, and the user on the kernel's
record (a file in its kernel directory, read back by ``list``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from provisioners.exceptions import ProvisionerConfigError
from provisioners.ssh.remote import USER_FILE, read_user
from provisioners.usernames import path_segment
from tests.helpers import SSH_PROVISIONER, execute

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]


@pytest.mark.parametrize("name", ["alice", "../../etc", "Bob Smith/..", "jürgen\n$(id)"])
async def test_each_user_works_in_their_own_directory(
    kernel_manager: Any, ssh_config: dict[str, Any], tmp_path: Path, name: str
) -> None:
    work = tmp_path / "work"
    home = work / path_segment(name)
    home.mkdir(parents=True)
    home.chmod(0o777)
    work.chmod(0o755)
    config = {**ssh_config, "remote_cwd": f"{work}/{{username}}", "env": {"WHO": "{username}"}}
    km = kernel_manager(SSH_PROVISIONER, config)
    await km.start_kernel(env={"KERNEL_USERNAME": name})
    try:
        code = "import os, json; print(json.dumps([os.getcwd(), os.environ['WHO']]))"
        out = await execute(km, code)
        assert out["status"] == "ok", out
        assert json.loads(out["stdout"]) == [str(home), path_segment(name)]
        engine = km.provisioner.engine
        record = (Path(engine.kernel_dir) / USER_FILE).read_text()
        assert read_user(record) == name and re.fullmatch(r"[0-9a-f]+\n", record)
        rows = await engine.list_kernels()
        assert [r["username"] for r in rows if r["kernel_id"] == km.kernel_id] == [name]
    finally:
        await km.shutdown_kernel()


async def test_a_per_user_directory_without_a_user_is_refused_by_name(
    kernel_manager: Any, ssh_config: dict[str, Any], tmp_path: Path
) -> None:
    km = kernel_manager(SSH_PROVISIONER, {**ssh_config, "remote_cwd": f"{tmp_path}/{{username}}"})
    with pytest.raises(ProvisionerConfigError, match="'remote_cwd' uses"):
        await km.start_kernel()
    assert not km.has_kernel

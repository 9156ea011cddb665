"""The jupyter-provisioners command line, run as a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli


@pytest.mark.parametrize(
    "args",
    [[], ["kernelspec"], ["kernelspec", "install"], ["run"], ["list"], ["cleanup"], ["config"]],
)
def test_help_everywhere(args: list[str]) -> None:
    result = cli(*args, "--help")
    assert result.returncode == 0
    assert "usage: jupyter-provisioners" in result.stdout


def test_install_run_list_cleanup(tmp_path: Path) -> None:
    result = cli(
        "kernelspec",
        "install",
        "py-cluster",
        "--prefix",
        str(tmp_path),
        "--set",
        'port_range="27000-27999"',
        "--set",
        'env={"GREETING": "hi there"}',
    )
    assert result.returncode == 0, result.stderr
    kernel_dir = tmp_path / "share" / "jupyter" / "kernels" / "py-cluster"
    spec = json.loads((kernel_dir / "kernel.json").read_text())
    stanza = spec["metadata"]["kernel_provisioner"]
    assert stanza["provisioner_name"] == "cluster-local-provisioner"
    # a local kernelspec of this Python is encrypted by default (its ipykernel can)
    assert stanza["config"] == {
        "port_range": "27000-27999",
        "env": {"GREETING": "hi there"},
        "transport_encryption": "required",
    }
    assert spec["metadata"]["supported_encryption"] == ["curve"]

    code_file = tmp_path / "job.py"
    code_file.write_text("import os\nprint(os.environ['GREETING'])\nprint(6 * 7)\n")
    run = cli(
        "run", "--kernel-dir", str(kernel_dir.parent), "--kernel", "py-cluster", str(code_file)
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["hi there", "42"]

    failing = cli(
        "run", "--kernel-dir", str(kernel_dir.parent), "--kernel", "py-cluster", "-c", "1/0"
    )
    assert failing.returncode == 1
    assert "ZeroDivisionError" in failing.stderr

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    cleaned = cli("cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "Removed" in cleaned.stdout


def test_bad_config_is_refused_before_writing(tmp_path: Path) -> None:
    result = cli("kernelspec", "install", "bad", "--prefix", str(tmp_path), "--set", "port_rang=1")
    assert result.returncode == 2
    assert "port_rang" in result.stderr and "'bad'" in result.stderr
    assert not (tmp_path / "share" / "jupyter" / "kernels" / "bad").exists()


def test_unknown_kernel_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("run", "--kernel-dir", str(tmp_path), "--kernel", "nope", "-c", "1")
    assert result.returncode == 2
    assert "no kernelspec named 'nope'" in result.stderr


@pytest.mark.parametrize("target", ["local", "docker", "ssh", "kubernetes"])
def test_config_lists_every_key_with_help(target: str) -> None:
    from provisioners.targets import load_target

    result = cli("config", target)
    assert result.returncode == 0, result.stderr
    traits = load_target(target).class_traits(config=True)
    for name, trait in traits.items():
        assert f"{name} (default" in result.stdout
        assert len((trait.help or "").split()) >= 3, f"{target}: '{name}' has no help text"


def test_a_literal_secret_is_refused_by_install(tmp_path: Path) -> None:
    """``--set ssh_password=...`` names what to use instead and writes nothing; a
    reference is installed as written."""
    args = ["kernelspec", "install", "pw", "--prefix", str(tmp_path)]
    result = cli(*args, "--set", "ssh_server=me@bastion", "--set", "ssh_password=hunter2")
    assert result.returncode == 2
    assert "ssh_password" in result.stderr and "literal secret" in result.stderr
    assert "file:" in result.stderr and "env:" in result.stderr
    assert "hunter2" not in result.stderr
    assert not (tmp_path / "share" / "jupyter" / "kernels" / "pw").exists()
    result = cli(*args, "--set", "ssh_server=me@bastion", "--set", "ssh_password=env:BASTION_PW")
    assert result.returncode == 0, result.stderr
    spec = json.loads(
        (tmp_path / "share" / "jupyter" / "kernels" / "pw" / "kernel.json").read_text()
    )
    assert spec["metadata"]["kernel_provisioner"]["config"]["ssh_password"] == "env:BASTION_PW"
    result = cli(*args, "--target", "ssh", "--set", "host=h", "--set", "password=hunter2")
    assert result.returncode == 2 and "'password'" in result.stderr, result.stderr

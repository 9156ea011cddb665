"""The connection API matches jupyter_client's: names, file format, mode, lookups."""

from __future__ import annotations

import inspect
import json
import stat
from pathlib import Path

import jupyter_client
import jupyter_client.connect
import pytest
from jupyter_client.connect import ConnectionFileMixin as JCMixin

import provisioners
from provisioners import (
    ConnectionFileMixin,
    LocalPortCache,
    connection_file_content,
    find_connection_file,
    write_connection_file,
)

API = [
    "write_connection_file",
    "find_connection_file",
    "tunnel_to_kernel",
    "ConnectionFileMixin",
    "LocalPortCache",
    "launch_kernel",
    "ssh_tunnel",
    "forward_tunnel",
    "KernelConnectionInfo",
]


@pytest.mark.parametrize("name", API)
def test_api_names_exist(name: str) -> None:
    assert getattr(provisioners, name) is not None


@pytest.mark.parametrize("name", ["write_connection_file", "find_connection_file", "launch_kernel"])
def test_signatures_match_jupyter_client(name: str) -> None:
    ours = inspect.signature(getattr(provisioners, name))
    theirs = inspect.signature(getattr(jupyter_client, name))
    assert list(ours.parameters) == list(theirs.parameters)


def test_our_connection_file_loads_in_jupyter_client(tmp_path: Path) -> None:
    info = {
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "hb_port": 4,
        "control_port": 5,
        "ip": "10.0.0.7",
        "key": b"secret-key",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }
    path = tmp_path / "ours.json"
    path.write_bytes(connection_file_content(info))
    mixin = JCMixin()
    mixin.load_connection_file(str(path))
    got = mixin.get_connection_info()
    assert got["key"] == b"secret-key"
    same = [k for k in info if k not in ("key", "kernel_name")]
    assert {k: got[k] for k in same} == {k: info[k] for k in same}
    assert json.loads(path.read_text())["kernel_name"] == "python3"


def test_jupyter_client_file_loads_in_ours(tmp_path: Path) -> None:
    fname, _ = jupyter_client.write_connection_file(
        str(tmp_path / "theirs.json"), shell_port=11, iopub_port=12, key=b"k", ip="127.0.0.1"
    )
    mixin = ConnectionFileMixin()
    mixin.load_connection_file(fname)
    assert mixin.shell_port == 11 and mixin.session.key == b"k"
    assert json.loads(connection_file_content(mixin.get_connection_info()))["iopub_port"] == 12


def test_written_files_are_0600(tmp_path: Path) -> None:
    (tmp_path / "conn").mkdir()
    fname, info = write_connection_file(str(tmp_path / "conn" / "kernel-x.json"), key=b"abc")
    assert stat.S_IMODE(Path(fname).stat().st_mode) == 0o600
    assert json.loads(Path(fname).read_text())["key"] == "abc" == info["key"]


def test_find_connection_file(tmp_path: Path) -> None:
    for name in ("kernel-1234-abcd.json", "kernel-5678.json"):
        write_connection_file(str(tmp_path / name))
    assert find_connection_file("kernel-1234-abcd.json", path=[str(tmp_path)]).endswith(
        "kernel-1234-abcd.json"
    )
    # by partial name, and by glob
    assert find_connection_file("1234", path=[str(tmp_path)]).endswith("kernel-1234-abcd.json")
    assert find_connection_file("kernel-56*", path=[str(tmp_path)]).endswith("kernel-5678.json")
    with pytest.raises(OSError):
        find_connection_file("no-such-kernel", path=[str(tmp_path)])


def test_local_port_cache_is_shared_and_returns_ports() -> None:
    cache = LocalPortCache.instance()
    assert cache is LocalPortCache.instance()
    ports = {cache.find_available_port("127.0.0.1") for _ in range(20)}
    assert len(ports) == 20
    # held across caches of this machine, not only inside this object
    from provisioners.connection.ports import ClusterPortCache

    held = ClusterPortCache.instance().held("localhost")["localhost"]
    assert ports <= set(held)
    for port in ports:
        cache.return_port(port)
    assert not ClusterPortCache.instance().held("localhost")


def test_connection_file_mixin_is_jupyter_clients() -> None:
    assert ConnectionFileMixin is jupyter_client.connect.ConnectionFileMixin

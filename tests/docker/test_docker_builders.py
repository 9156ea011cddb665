"""The Docker target's pure builders, checked as data (no daemon needed)."""

from __future__ import annotations

import io
import json
import tarfile

import docker
import pytest

from provisioners.docker import (
    DockerClusterProvisioner,
    DockerEngine,
    connection_archive,
    parse_gpus,
    parse_ports_label,
)
from provisioners.docker.daemon import is_local_daemon, lookup_id
from provisioners.lifecycle.owner import ServerIdentity

PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "hb_port": 4, "control_port": 5}


def _engine(**config: object) -> DockerEngine:
    prov = DockerClusterProvisioner(kernel_id="k-1", image="img:1", **config)
    engine = prov.engine
    assert isinstance(engine, DockerEngine)
    engine.kernel_info = dict(PORTS, key=b"secret-key", ip="0.0.0.0")
    return engine


def test_create_args_as_data() -> None:
    prov = _engine(
        user="jovyan",
        working_dir="/work",
        cpu_limit=1.5,
        memory_limit="2g",
        gpus="all",
        network="kernels",
        volumes=["data:/data:ro"],
        mounts=[{"Type": "tmpfs", "Target": "/scratch"}],
        labels={"team": "a"},
        extra_create_args={"shm_size": "1g"},
    )
    args = prov.create_args(["python3", "-f", "/c.json"], {"KERNEL_X": "1"}, "name-1")
    assert args == {
        "image": "img:1",
        "command": ["python3", "-f", "/c.json"],
        "name": "name-1",
        "environment": {"KERNEL_X": "1"},
        "labels": {
            "team": "a",
            "app.kubernetes.io/managed-by": "cluster-provisioners",
            "cluster-provisioners.kernel-id": "k-1",
            "cluster-provisioners.owner": str(ServerIdentity.current()),
            "cluster-provisioners.connection.ports": "1,2,3,4,5",
            "cluster-provisioners.kernelspec": "",
        },
        "detach": True,
        "ports": {f"{p}/tcp": ("127.0.0.1", p) for p in range(1, 6)},
        "network": "kernels",
        "volumes": ["data:/data:ro"],
        "mounts": [{"Type": "tmpfs", "Target": "/scratch"}],
        "working_dir": "/work",
        "user": "jovyan",
        "nano_cpus": 1_500_000_000,
        "mem_limit": "2g",
        "device_requests": [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": 4096,
        "shm_size": "1g",
    }
    assert "secret-key" not in json.dumps(args, default=str)


def test_create_args_container_ip_mode_publishes_nothing() -> None:
    prov = _engine(network="kernels", connect_via_container_ip=True)
    args = prov.create_args(["k"], {}, "n")
    assert "ports" not in args
    assert args["network"] == "kernels"


def test_connection_archive_modes_and_owner() -> None:
    data = connection_archive("jupyter-kernel-k", b'{"key": "x"}', 1000, 100)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        folder, entry = tar.getmembers()
        assert (folder.name, folder.isdir(), folder.mode) == ("jupyter-kernel-k", True, 0o700)
        assert (entry.name, entry.mode) == ("jupyter-kernel-k/connection.json", 0o600)
        assert {(m.uid, m.gid) for m in (folder, entry)} == {(1000, 100)}
        assert tar.extractfile(entry).read() == b'{"key": "x"}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("2", [{"Count": 2, "Capabilities": [["gpu"]]}]),
        ("device=0,1", [{"Count": 0, "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}]),
    ],
)
def test_parse_gpus(text: str, expected: list[dict]) -> None:
    got = [{k: v for k, v in r.items() if v not in ("", None, [], {})} for r in parse_gpus(text)]
    assert got == expected


def test_small_parsers() -> None:
    assert parse_ports_label("20001,20002, x,") == {20001, 20002}
    passwd = b"root:x:0:0:root:/root:/bin/bash\njovyan:x:1000:100::/home/jovyan:/bin/bash\n"
    assert lookup_id(passwd, "jovyan") == (1000, 100)
    assert lookup_id(passwd, "nobody") is None


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("", True),
        ("unix:///var/run/docker.sock", True),
        ("tcp://127.0.0.1:2375", True),
        ("tcp://build-host:2376", False),
        ("ssh://me@build-host", False),
    ],
)
def test_local_daemon_detection(url: str, local: bool) -> None:
    engine = _engine(docker_host=url, publish_ip="0.0.0.0")
    assert engine.is_local_daemon() is is_local_daemon(url) is local

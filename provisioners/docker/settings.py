"""The Docker target's settings and their checks; the kernel runs in :mod:`.engine`."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING, Any, ClassVar

import docker
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode, default

from ..settings import SharedSettings
from .daemon import CREATE_KEYS, GPUS_SPEC, MANAGED_CREATE_KEYS, OUR_LABELS, is_local_daemon

if TYPE_CHECKING:
    from ..parameters import LaunchParameters


class DockerSettings(SharedSettings):
    """What a Docker kernelspec may set: the image, the daemon, resources and hardening."""

    #: Settings where ``{username}`` stands for the kernel's user (a safe path segment).
    username_settings: ClassVar[tuple[str, ...]] = ("volumes", "mounts", "working_dir", "env")

    launch_resources: ClassVar[tuple[str, ...]] = ("cpu", "memory", "gpus", "image")

    image = Unicode(
        "",
        config=True,
        help="""Image the kernel's container runs (required). It needs only a stock kernel
        (e.g. ipykernel) on its PATH; the kernelspec's argv, or 'command', is its command,
        and its connection file is copied into the container before it starts. Pulled as
        'pull_policy' says. Example: 'quay.io/jupyter/scipy-notebook:2024-12-02' or
        'registry.example.org/team/kernel@sha256:...'.""",
    )
    docker_host = Unicode(
        config=True,
        help="""URL of the Docker daemon (unix://, tcp://, ssh://). Default: the DOCKER_HOST
        environment variable, else the local socket. TLS settings come from DOCKER_TLS_VERIFY and
        DOCKER_CERT_PATH. For a remote daemon, set ssh_server (tunnels to its loopback) or
        publish_ip.""",
    )
    api_timeout = Float(
        30.0,
        config=True,
        help="""Seconds each Docker API call may take (create, start, inspect, remove...);
        a pull streams its progress and is bounded by launch_timeout instead.""",
    )
    connect_timeout = Float(
        3.0,
        config=True,
        help="""Seconds to reach the daemon before it counts as unreachable (then the local
        fallback applies).""",
    )
    pull_policy = CaselessStrEnum(
        ["never", "if-missing", "always"],
        default_value="if-missing",
        config=True,
        help="""When to pull the image: 'never' (must be present), 'if-missing', or 'always'
        (pull before each start).""",
    )
    publish_ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""Host IP the kernel's ports are published on. '0.0.0.0' exposes them on every
        interface of the daemon's host: only do that on a trusted network.""",
    )
    network = Unicode(
        "",
        config=True,
        help="""Docker network the kernel's container joins, as 'docker run --network'
        (default: the daemon's default bridge). Needed with 'connect_via_container_ip' when
        the server runs in a container itself: name the network both share. Example:
        'jupyter-kernels'.""",
    )
    connect_via_container_ip = Bool(
        False,
        config=True,
        help="""Publish nothing and connect to the container's IP on 'network' directly; for a
        server that runs on that network itself (see 'container_ip_relay').""",
    )
    container_ip_relay = Bool(
        True,
        config=True,
        help="""With 'connect_via_container_ip' (and no 'ssh_server', whose tunnels keep their
        local ports anyway), give clients local listeners (127.0.0.1, one per channel) that
        relay to the container's IP, and point them at the new container on each restart: a
        restart makes a new container with a new IP, and a client whose sockets stay open (a
        websocket that JupyterLab or a gateway keeps through a restart) would keep talking to
        the old one. Off: clients get the bare container IP (reachable from other machines
        on that network, one hop less), and such clients lose the kernel at every restart.""",
    )
    volumes = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Bind mounts and named volumes of the kernel's container, each
        'SOURCE:TARGET[:MODE]' as in 'docker run -v'; SOURCE is a host path (on the
        daemon's machine) or a volume name, TARGET an absolute path in the container. With
        a local daemon, the server resolves a kernel's paths under a bind mount to its
        own files. '{username}' stands for the kernel's user (the start request's
        KERNEL_USERNAME) made a safe path segment and volume name ('../x' and 'jürgen'
        become 'x--<hash>' and 'jurgen--<hash>'); a kernel without a user then fails to
        start, naming this setting. Example: ['/srv/notebooks:/home/jovyan/work',
        'datasets:/data:ro'], or a volume per user: ['home-{username}:/home/jovyan/work']
        (Docker creates it at the user's first kernel; later kernels of that user mount
        it again).""",
    )
    mounts = List(
        Dict(),
        default_value=[],
        config=True,
        help="""Mounts of the kernel's container in the Docker API form (each needs a
        'Target'), for what 'volumes' cannot say: tmpfs, volume options, read-only binds.
        '{username}' works as in 'volumes'. Example: [{"Type": "tmpfs", "Target":
        "/scratch"}, {"Type": "volume", "Source": "data", "Target": "/data", "ReadOnly":
        true}], or a host directory per user: [{"Type": "bind", "Source":
        "/srv/home/{username}", "Target": "/home/jovyan/work"}] (it must exist).""",
    )
    working_dir = Unicode(
        "",
        config=True,
        help="""The kernel's working directory in its container, as 'docker run -w'
        (default: the image's WORKDIR). Relative paths the kernel reports are taken from
        here; '{username}' works as in 'volumes'. Example: '/home/jovyan/work',
        '/home/jovyan/{username}'.""",
    )
    user = Unicode(
        "",
        config=True,
        help="""User the kernel runs as in its container, 'name|uid[:group|gid]' as
        'docker run -u' (default: the image's USER). A name must exist in the image's
        /etc/passwd; the connection file is given to that user. Example: 'jovyan',
        '1000:100'.""",
    )
    cpu_limit = Float(
        0.0,
        config=True,
        help="""CPUs the kernel's container may use, as 'docker run --cpus'; fractions are
        allowed. 0: no limit. Example: 1.5.""",
    )
    memory_limit = Unicode(
        "",
        config=True,
        help="""Most memory the kernel's container may use, as 'docker run -m': a number
        with an optional unit (b, k, m, g). Past it the kernel is killed (out of
        memory). '': no limit. Example: '2g'.""",
    )
    gpus = Unicode(
        "",
        config=True,
        help="""GPUs given to the kernel's container, as 'docker run --gpus' (the daemon
        needs the NVIDIA container toolkit): 'all', a count, or 'device=ID,...'. '': none.
        Example: '1', 'device=0,2'.""",
    )
    cap_drop = List(
        Unicode(),
        default_value=["ALL"],
        config=True,
        help="""Linux capabilities dropped from the kernel's container, as 'docker run
        --cap-drop' (default: all of them; a stock ipykernel needs none). [] keeps
        Docker's default set. Example: ['ALL'] with cap_add ['NET_RAW'] for ping.""",
    )
    cap_add = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Linux capabilities given back to the kernel's container after 'cap_drop',
        as 'docker run --cap-add'; names without the CAP_ prefix. Example: ['NET_RAW'] to
        let the kernel ping, ['SYS_PTRACE'] for a debugger that attaches to processes.""",
    )
    no_new_privileges = Bool(
        True,
        config=True,
        help="""Run the kernel with 'no-new-privileges': setuid/setgid binaries and file
        capabilities cannot raise its privileges.""",
    )
    pids_limit = Int(
        4096,
        config=True,
        help="""Most processes and threads the kernel's container may run at once, as
        'docker run --pids-limit' (a fork bomb stops there; a kernel with many worker
        threads may need more). 0: no limit. Example: 512.""",
    )
    labels = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra labels of the kernel's container, for your own tooling (cost
        reports, 'docker ps --filter label=...'). Ours (app.kubernetes.io/managed-by and
        cluster-provisioners.*) are set by the provisioner and refused here. Example:
        {"team": "data", "cost-center": "42"}.""",
    )
    extra_create_args = Dict(
        default_value={},
        config=True,
        help="""More keyword arguments of docker-py's containers.create, for container
        settings without an option of their own; they override the values derived from
        the other options. The image, command, environment, labels, ports and name are
        the provisioner's and refused here. Example: {"shm_size": "1g", "init": true} (a
        larger /dev/shm for PyTorch data loaders, an init process that reaps zombies).""",
    )
    name_prefix = Unicode(
        "jupyter-kernel-",
        config=True,
        help="""Prefix of the kernel containers' names: a container is named
        '<prefix><kernel id>-<4 hex digits>'. Letters, digits and '_.-'. Example:
        'team-a-kernel-'.""",
    )
    sweep_on_start = Bool(
        True,
        config=True,
        help="""Remove containers left by dead servers of this machine once per process, when the
        first kernel starts (in a thread).""",
    )

    @default("docker_host")
    def _docker_host_default(self) -> str:
        return os.environ.get("DOCKER_HOST", "")

    def launch_settings(self, params: LaunchParameters) -> dict[str, Any]:
        """cpu → ``cpu_limit``, memory → ``memory_limit`` (bytes), gpus → ``gpus`` (a
        count; 0: none), image → ``image``. Pure; never raises."""
        found: dict[str, Any] = {}
        if params.cpu is not None:
            found["cpu_limit"] = params.cpu
        if params.memory_bytes is not None:
            found["memory_limit"] = str(params.memory_bytes)
        if params.gpus is not None:
            found["gpus"] = str(params.gpus) if params.gpus else ""
        if params.image is not None:
            found["image"] = params.image
        return found

    def validate_config(self) -> None:
        super().validate_config()
        if not self.image:
            raise self.config_error("image", "required: the Docker image the kernel runs in")
        if self.docker_host and "://" not in self.docker_host:
            raise self.config_error("docker_host", f"{self.docker_host!r} is not a URL")
        for key in ("api_timeout", "connect_timeout"):
            if getattr(self, key) <= 0:
                raise self.config_error(key, "must be a positive number of seconds")
        try:
            ipaddress.ip_address(self.publish_ip)
        except ValueError as exc:
            raise self.config_error("publish_ip", f"{self.publish_ip!r} is not an IP") from exc
        for spec in self.volumes:
            parts = spec.split(":")
            if len(parts) not in (2, 3) or not all(parts) or not parts[1].startswith("/"):
                raise self.config_error("volumes", f"{spec!r} is not 'SOURCE:/TARGET[:MODE]'")
        if any("Target" not in m for m in self.mounts):
            raise self.config_error("mounts", "every mount needs a 'Target'")
        if self.cpu_limit < 0:
            raise self.config_error("cpu_limit", "must be >= 0")
        if self.pids_limit < 0:
            raise self.config_error("pids_limit", "must be >= 0 (0: no limit)")
        for key in ("cap_drop", "cap_add"):
            bad = [c for c in getattr(self, key) if not re.fullmatch(r"[A-Za-z_]+", c)]
            if bad:
                raise self.config_error(key, f"{bad} are not capability names (e.g. 'NET_RAW')")
        if self.memory_limit:
            try:
                docker.utils.parse_bytes(self.memory_limit)
            except docker.errors.DockerException as exc:
                raise self.config_error("memory_limit", str(exc)) from exc
        if self.gpus and not GPUS_SPEC.match(self.gpus):
            raise self.config_error("gpus", f"{self.gpus!r}: use 'all', N or 'device=ID,...'")
        reserved = sorted(k for k in self.labels if k in OUR_LABELS)
        if reserved:
            raise self.config_error("labels", f"{reserved} are set by the provisioner")
        for key in sorted(self.extra_create_args):
            if key in MANAGED_CREATE_KEYS:
                raise self.config_error(
                    "extra_create_args", f"{key!r} is set by the provisioner (see its options)"
                )
            if key not in CREATE_KEYS:
                raise self.config_error(
                    "extra_create_args", f"{key!r} is not an argument of containers.create"
                )
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", self.name_prefix):
            raise self.config_error(
                "name_prefix", "start with a letter or digit; then letters, digits, '_.-'"
            )
        reachable = (
            is_local_daemon(self.docker_host) or self.ssh_server or self.connect_via_container_ip
        )
        if ipaddress.ip_address(self.publish_ip).is_loopback and not reachable:
            raise self.config_error(
                "publish_ip",
                f"a remote daemon ({self.docker_host}) publishes {self.publish_ip} on its "
                "own loopback: set ssh_server to tunnel to it, or publish on an address "
                "this server reaches (e.g. 0.0.0.0 on a trusted network)",
            )

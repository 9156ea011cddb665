"""The Docker target's settings and their checks (the provisioner is in :mod:`.provisioner`)."""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlparse

import docker
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode, default

from ..settings import SharedSettings
from .engine import CREATE_KEYS, GPUS_SPEC, MANAGED_CREATE_KEYS, OUR_LABELS


class DockerSettings(SharedSettings):
    """What a Docker kernelspec may set: the image, the daemon, resources and hardening."""

    image = Unicode(
        "", config=True, help="Image the kernel runs in (required); it needs only a stock kernel."
    )
    docker_host = Unicode(
        config=True,
        help="""URL of the Docker daemon (unix://, tcp://, ssh://). Default: the DOCKER_HOST
        environment variable, else the local socket. TLS settings come from DOCKER_TLS_VERIFY and
        DOCKER_CERT_PATH. For a remote daemon, set ssh_server (tunnels to its loopback) or
        publish_ip.""",
    )
    api_timeout = Float(30.0, config=True, help="Seconds each Docker API call may take.")
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
        "", config=True, help="Docker network the container joins (default: the daemon's)."
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
        help="Bind mounts / named volumes as 'SOURCE:TARGET[:MODE]', as in 'docker run -v'.",
    )
    mounts = List(
        Dict(),
        default_value=[],
        config=True,
        help="""Mounts in the Docker API form, e.g. {"Type": "tmpfs", "Target": "/scratch"} or
        {"Type": "volume", "Source": "data", "Target": "/data", "ReadOnly": true}.""",
    )
    working_dir = Unicode("", config=True, help="Kernel working directory (default: the image's).")
    user = Unicode(
        "",
        config=True,
        help="User the kernel runs as, 'name|uid[:group|gid]' (default: the image's user).",
    )
    cpu_limit = Float(0.0, config=True, help="CPUs the kernel may use (e.g. 1.5); 0: no limit.")
    memory_limit = Unicode(
        "", config=True, help="Memory limit as in 'docker run -m' (e.g. '2g'); '': no limit."
    )
    gpus = Unicode(
        "", config=True, help="GPUs as in 'docker run --gpus': '', 'all', a count, or 'device=0,1'."
    )
    cap_drop = List(
        Unicode(),
        default_value=["ALL"],
        config=True,
        help="""Linux capabilities dropped from the kernel container (default: all of them; a
        stock ipykernel needs none). [] keeps Docker's default set.""",
    )
    cap_add = List(
        Unicode(),
        default_value=[],
        config=True,
        help="Linux capabilities given back to the kernel container (e.g. ['NET_RAW']).",
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
        help="""Most processes and threads the kernel container may run (a fork bomb stops
        there); 0: no limit.""",
    )
    labels = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="Extra labels for the kernel container (ours, cluster-provisioners.*, win).",
    )
    extra_create_args = Dict(
        default_value={},
        config=True,
        help="""More keyword arguments of docker-py's containers.create (e.g. {"shm_size": "1g",
        "init": true}); they override the values derived from the other options.""",
    )
    name_prefix = Unicode(
        "jupyter-kernel-", config=True, help="Prefix of the container names (then the kernel id)."
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
        reachable = self._is_local_daemon() or self.ssh_server or self.connect_via_container_ip
        if ipaddress.ip_address(self.publish_ip).is_loopback and not reachable:
            raise self.config_error(
                "publish_ip",
                f"a remote daemon ({self.docker_host}) publishes {self.publish_ip} on its "
                "own loopback: set ssh_server to tunnel to it, or publish on an address "
                "this server reaches (e.g. 0.0.0.0 on a trusted network)",
            )

    def _is_local_daemon(self) -> bool:
        url = urlparse(self.docker_host or "unix://")
        if url.scheme in ("unix", "npipe", "http+unix"):
            return True
        return url.scheme in ("tcp", "http", "https") and url.hostname in (
            "localhost",
            "127.0.0.1",
            "::1",
        )

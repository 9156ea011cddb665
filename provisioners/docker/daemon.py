"""Talking to a Docker daemon outside a kernel's lifecycle.

Clients (:func:`connect_docker`, :func:`is_local_daemon`), the labels that mark our
containers, the orphan sweep (once per daemon and process), the ports our containers hold
(:class:`DockerPortSource`), and pure builders: ``containers.create`` arguments, the
connection-file archive, GPU requests, uid/gid lookups and stop-signal names.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import signal
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import requests
from docker.models.containers import RUN_CREATE_KWARGS, RUN_HOST_CONFIG_KWARGS
from docker.transport import UnixHTTPAdapter

from ..connection.files import PORT_NAMES
from ..connection.ports import PortSource
from ..connection.sshconnect import SSHSettings
from ..exceptions import EngineUnavailableError, KernelStartError, ProvisionerError
from ..lifecycle.owner import adoptable, detached_mark, detached_since, sweep_verdict
from ..parameters import decode_launch_env
from ..settings import SharedSettings

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "cluster-provisioners"
LABEL_KERNEL_ID = "cluster-provisioners.kernel-id"
LABEL_OWNER = "cluster-provisioners.owner"
LABEL_PORTS = "cluster-provisioners.connection.ports"
LABEL_KERNELSPEC = "cluster-provisioners.kernelspec"
#: On a warm (pool) kernel's container: its name prefix. Labels cannot change, so once
#: the kernel is claimed its id is read from the container's new name.
LABEL_POOL_PREFIX = "cluster-provisioners.pool.name-prefix"
#: On a kernel started with ``persist_kernels``: "true". It outlives its server, and waits
#: ``adoption_grace`` seconds (the label below, read by sweeps without settings) for the
#: next server to adopt it.
LABEL_PERSIST = "cluster-provisioners.persist"
LABEL_GRACE = "cluster-provisioners.adoption-grace"
#: The kernel's user (the start request's KERNEL_USERNAME). A claimed warm kernel's
#: container, created without one, has its user in the file ``user`` (:func:`write_user`).
LABEL_USERNAME = "cluster-provisioners.username"
#: The kernel's launch parameters that differ from its kernelspec's defaults (JSON of
#: KERNEL_<NAME> values): the adopting server restarts the kernel with them.
LABEL_LAUNCH_ENV = "cluster-provisioners.launch-env"
OUR_LABELS = (
    LABEL_MANAGED_BY,
    LABEL_KERNEL_ID,
    LABEL_OWNER,
    LABEL_PORTS,
    LABEL_KERNELSPEC,
    LABEL_POOL_PREFIX,
    LABEL_PERSIST,
    LABEL_GRACE,
    LABEL_USERNAME,
    LABEL_LAUNCH_ENV,
)
#: The adoption grace of a persisted container without a readable grace label.
DEFAULT_GRACE = float(SharedSettings.class_traits()["adoption_grace"].default_value)

#: ``extra_create_args`` keys we set ourselves; the traits are the way to change them.
MANAGED_CREATE_KEYS = frozenset(
    {"image", "command", "environment", "labels", "ports", "detach", "name", "version"}
)
CREATE_KEYS = (
    frozenset(RUN_CREATE_KWARGS)
    | frozenset(RUN_HOST_CONFIG_KWARGS)
    | {"volumes", "network", "networking_config"}
) - MANAGED_CREATE_KEYS
GPUS_SPEC = re.compile(r"^(all|\d+|device=[\w.,-]+)$")
UNSAFE_NAME = re.compile(r"[^a-zA-Z0-9_.-]")
#: Daemons (by port host key) already swept for orphans by this process.
_SWEPT: set[str] = set()
_SWEPT_LOCK = threading.Lock()
#: A logger, or the server's adapter of one.
Log = logging.Logger | logging.LoggerAdapter[Any]

ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def connect_docker(
    docker_host: str = "",
    *,
    timeout: float = 30.0,
    connect_timeout: float = 3.0,
    ssh: SSHSettings | None = None,
) -> docker.DockerClient:
    """A client of ``docker_host`` (default: DOCKER_HOST, else the local socket).

    Reaching the daemon (the API version check) may take ``connect_timeout`` seconds,
    every later call ``timeout``. Raises :class:`EngineUnavailableError`. An ``ssh://``
    daemon is reached with ``ssh`` (our settings and host-key policy) when given.
    """
    environment = dict(os.environ)
    if docker_host:
        environment["DOCKER_HOST"] = docker_host
    try:
        if ssh is not None and environment.get("DOCKER_HOST", "").startswith("ssh://"):
            from .sshdaemon import docker_over_ssh

            client = docker_over_ssh(environment["DOCKER_HOST"], ssh, timeout=connect_timeout)
        else:
            client = docker.from_env(
                environment=environment, timeout=connect_timeout, max_pool_size=32
            )
    except ENGINE_ERRORS as exc:
        where = docker_host or environment.get("DOCKER_HOST") or "the local socket"
        msg = f"Docker daemon at {where} is unreachable: {exc}"
        raise EngineUnavailableError(msg, target="docker") from exc
    client.api.timeout = timeout
    _one_pool_per_socket(client)
    return client


#: The mount point docker-py routes unix-socket requests through.
_UNIX_PREFIX = "http+docker://"


class _OnePoolUnixAdapter(UnixHTTPAdapter):  # type: ignore[misc]
    """docker-py's unix-socket adapter with one connection pool for every URL.

    docker-py keeps a pool per request URL (each container's inspect, kill, archive…),
    each holding its idle connection open: a client talking to many containers kept a
    socket to dockerd for each. One pool keeps at most as many as calls ran at once.
    """

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection(_UNIX_PREFIX, proxies)


def _one_pool_per_socket(client: docker.DockerClient) -> None:
    """Give a unix-socket client :class:`_OnePoolUnixAdapter` (other transports already
    pool per host)."""
    api = client.api
    old = api.adapters.get(_UNIX_PREFIX)
    if not isinstance(old, UnixHTTPAdapter) or isinstance(old, _OnePoolUnixAdapter):
        return
    adapter = _OnePoolUnixAdapter(
        f"http+unix://{old.socket_path}", old.timeout, max_pool_size=old.max_pool_size
    )
    api.mount(_UNIX_PREFIX, adapter)
    old.close()


def is_local_daemon(docker_host: str) -> bool:
    """True when ``docker_host`` ('' for the local socket) is a daemon of this machine."""
    url = urlparse(docker_host or "unix://")
    if url.scheme in ("unix", "npipe", "http+unix"):
        return True
    return url.scheme in ("tcp", "http", "https") and url.hostname in (
        "localhost",
        "127.0.0.1",
        "::1",
    )


def ping(client: docker.DockerClient, timeout: float) -> None:
    """GET the daemon's ``/_ping`` within ``timeout`` seconds; raise on failure."""
    api = client.api
    response = api.get(f"{api.base_url}/_ping", timeout=timeout)
    response.raise_for_status()


def read_file(container: Any, path: str) -> bytes:
    """The content of the file ``path`` in ``container``; b"" when it cannot be read."""
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(posixpath.basename(path))
            return member.read() if member is not None else b""
    except (*ENGINE_ERRORS, tarfile.TarError, KeyError):
        return b""


def container_kernel_dir(kernel_id: str) -> str:
    """The kernel's private directory in its container (connection file, owner)."""
    return f"/tmp/jupyter-kernel-{UNSAFE_NAME.sub('-', kernel_id)}"


def owner_archive(owner: str) -> bytes:
    """A tar of the file ``owner`` (0600): the server that reattached the kernel.

    Labels cannot change once a container exists; a server that reattaches a kernel
    writes itself here, into :func:`container_kernel_dir`, and sweeps read it.
    """
    return _record_archive("owner", owner)


def _record_archive(name: str, text: str) -> bytes:
    """A tar of the one-line file ``name`` (0600) holding ``text``."""
    content = f"{text}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mode, entry.mtime = len(content), 0o600, time.time()
        tar.addfile(entry, io.BytesIO(content))
    return buf.getvalue()


def write_user(client: docker.DockerClient, container_id: str, dir_id: str, username: str) -> None:
    """Write ``username`` as the user of a claimed warm kernel's container (created
    without one; labels cannot change), as the file ``user`` next to its owner record.
    Raises the daemon's errors (:data:`ENGINE_ERRORS`)."""
    archive = _record_archive("user", username)
    client.api.put_archive(container_id, container_kernel_dir(dir_id), archive)


def current_username(client: docker.DockerClient, item: Mapping[str, Any]) -> str:
    """The user of a listed kernel container: its label, else (a claimed warm kernel)
    the file :func:`write_user` wrote; '' when none."""
    labels = item.get("Labels") or {}
    if labels.get(LABEL_USERNAME):
        return str(labels[LABEL_USERNAME])
    if LABEL_POOL_PREFIX not in labels:
        return ""
    return _read_record(client, item["Id"], labels.get(LABEL_KERNEL_ID, ""), "user")


def _moved_owner(client: docker.DockerClient, container_id: str, kernel_id: str) -> str:
    """The owner record written into the container after its creation ('' when none): a
    reattaching server's identity, or a detached mark (see :func:`owner_archive`)."""
    return _read_record(client, container_id, kernel_id, "owner")


def _read_record(client: docker.DockerClient, container_id: str, kernel_id: str, name: str) -> str:
    """The one-line file ``name`` of the container's kernel directory ('' when none)."""
    path = posixpath.join(container_kernel_dir(kernel_id), name)
    try:
        stream, _ = client.api.get_archive(container_id, path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(name)
            return member.read().decode().strip() if member is not None else ""
    except (*ENGINE_ERRORS, tarfile.TarError, KeyError, UnicodeDecodeError):
        return ""


def write_owner(client: docker.DockerClient, container_id: str, dir_id: str, owner: str) -> None:
    """Write ``owner`` (a server's identity or a detached mark) as the owner record of the
    kernel container ``container_id``, whose kernel directory is named after ``dir_id``.
    Raises the daemon's errors (:data:`ENGINE_ERRORS`)."""
    client.api.put_archive(container_id, container_kernel_dir(dir_id), owner_archive(owner))


def current_owner(client: docker.DockerClient, item: Mapping[str, Any]) -> str:
    """The owner record of a listed kernel container: the one written into it since
    (:func:`write_owner`), else its owner label."""
    labels = item.get("Labels") or {}
    moved = _moved_owner(client, item["Id"], labels.get(LABEL_KERNEL_ID, ""))
    return moved or labels.get(LABEL_OWNER, "")


def is_persisted(item: Mapping[str, Any]) -> bool:
    """True when a listed kernel container can outlive its server: started with
    ``persist_kernels``, running, and no unclaimed warm kernel (a pool's own)."""
    labels = item.get("Labels") or {}
    name = (item.get("Names") or ["/?"])[0]
    return (
        labels.get(LABEL_PERSIST) == "true"
        and item.get("State") == "running"
        and not listed_kernel_id(labels, name)[1]
    )


def record_grace(labels: Mapping[str, str]) -> float:
    """The adoption grace a container was started with (its label), else the default."""
    try:
        return float(labels.get(LABEL_GRACE, DEFAULT_GRACE))
    except ValueError:
        return DEFAULT_GRACE


def sweep_orphans(
    client: docker.DockerClient,
    log: Log | None = None,
    grace: float | None = None,
    spec_name: str = "",
) -> list[str]:
    """Remove our kernel containers whose owning server process is gone.

    The owner record is the one a server wrote into the container after its creation (a
    reattach, an adoption, a detach: see :func:`write_owner`), else the owner label. Only
    owners on this machine can be checked: a live server's containers (and those of
    servers on other machines) are never touched. A persisted kernel (:func:`is_persisted`)
    whose server died is marked detached instead, and kept; a detached one is removed once
    ``grace`` seconds (default: its own ``adoption-grace`` label) have passed since its
    mark, or at once when it no longer runs (there is nothing to adopt). With
    ``spec_name``, ``grace`` (a server's setting) applies to that kernelspec's containers
    only: the others keep the grace of their own kernelspec, their label. Returns the
    removed container ids.
    """
    log = log or logging.getLogger(__name__)
    removed: list[str] = []
    found = client.api.containers(all=True, filters={"label": f"{LABEL_MANAGED_BY}={MANAGED_BY}"})
    for item in found:
        labels = item.get("Labels") or {}
        if not labels.get(LABEL_OWNER):
            continue
        owner = current_owner(client, item)
        own = not spec_name or labels.get(LABEL_KERNELSPEC) == spec_name
        wait = grace if grace is not None and own else record_grace(labels)
        verdict = sweep_verdict(owner, is_persisted(item), wait)
        if detached_since(owner) is not None and item.get("State") != "running":
            verdict = "remove"
        kernel_id = labels.get(LABEL_KERNEL_ID, "?")
        if verdict == "keep":
            continue
        if verdict == "mark":
            try:
                write_owner(client, item["Id"], labels.get(LABEL_KERNEL_ID, ""), detached_mark())
            except ENGINE_ERRORS as exc:
                log.warning("Could not mark kernel container %s detached: %s", item["Id"][:12], exc)
                continue
            log.info(
                "Kernel container %s (kernel %s) persists: its server %s is gone; it waits "
                "%g s for a server to adopt it",
                item["Id"][:12],
                kernel_id,
                owner,
                wait,
            )
            continue
        try:
            client.api.remove_container(item["Id"], v=True, force=True)
        except docker.errors.NotFound:
            continue
        except ENGINE_ERRORS as exc:
            log.warning("Could not remove orphaned kernel container %s: %s", item["Id"][:12], exc)
            continue
        log.info(
            "Removed orphaned kernel container %s (kernel %s, owner %s %s)",
            item["Id"][:12],
            kernel_id,
            owner,
            "not adopted in time" if detached_since(owner) is not None else "gone",
        )
        removed.append(item["Id"])
    return removed


def adoptable_containers(
    client: docker.DockerClient, spec_name: str, log: Log | None = None
) -> list[dict[str, Any]]:
    """Our running, persisted kernel containers of kernelspec ``spec_name`` whose owner
    record is :func:`~provisioners.lifecycle.owner.adoptable` (detached, or a server known
    to be gone), each as ``{"kernel_id", "dir_id", "container_id", "container_name",
    "networks", "kernel_info", "username", "launch_env"}`` (``kernel_info``: the kernel's
    own connection file, key and Curve keys as text). A container whose connection file
    cannot be read is left out and logged, without its content. Raises the daemon's
    errors (:data:`ENGINE_ERRORS`).
    """
    log = log or logging.getLogger(__name__)
    wanted = [f"{LABEL_MANAGED_BY}={MANAGED_BY}", f"{LABEL_PERSIST}=true"]
    if spec_name:
        wanted.append(f"{LABEL_KERNELSPEC}={spec_name}")
    found = client.api.containers(filters={"label": wanted})  # running ones
    records = []
    for item in found:
        labels = item.get("Labels") or {}
        if labels.get(LABEL_KERNELSPEC, "") != spec_name or not is_persisted(item):
            continue
        if not adoptable(current_owner(client, item)):
            continue
        name = (item.get("Names") or ["/?"])[0].lstrip("/")
        kernel_id = listed_kernel_id(labels, name)[0]
        dir_id = labels.get(LABEL_KERNEL_ID, "")
        path = posixpath.join(container_kernel_dir(dir_id), "connection.json")
        info = _connection_file(client, item["Id"], path)
        if info is None:
            log.warning(
                "Kernel %s: cannot read its connection file in container %s; not adopted",
                kernel_id,
                name,
            )
            continue
        networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
        records.append(
            {
                "kernel_id": kernel_id,
                "dir_id": dir_id,
                "container_id": item["Id"],
                "container_name": name,
                "networks": {k: (v or {}).get("IPAddress") or "" for k, v in networks.items()},
                "kernel_info": info,
                "username": current_username(client, item),
                "launch_env": decode_launch_env(labels.get(LABEL_LAUNCH_ENV)),
            }
        )
    return records


def _connection_file(
    client: docker.DockerClient, container_id: str, path: str
) -> dict[str, Any] | None:
    """The kernel's connection file at ``path`` in the container, if it holds a key and
    the five ports; None otherwise."""
    try:
        stream, _ = client.api.get_archive(container_id, path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(posixpath.basename(path))
            info = json.loads(member.read()) if member is not None else None
    except (*ENGINE_ERRORS, tarfile.TarError, KeyError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("key"), str):
        return None
    if not all(isinstance(info.get(name), int) and info[name] > 0 for name in PORT_NAMES):
        return None
    return info


def _sweep_quietly(
    docker_host: str,
    timeout: float,
    log: Log,
    ssh: SSHSettings | None = None,
    grace: float | None = None,
    spec_name: str = "",
) -> None:
    """Run :func:`sweep_orphans` on a client of its own; log instead of raising."""
    try:
        client = connect_docker(docker_host, timeout=timeout, connect_timeout=timeout, ssh=ssh)
        try:
            sweep_orphans(client, log, grace, spec_name)
        finally:
            client.close()
    except (*ENGINE_ERRORS, ProvisionerError) as exc:
        log.warning("Sweeping orphaned kernel containers failed: %s", exc)


def sweep_once(
    key: str,
    docker_host: str,
    timeout: float,
    log: Log,
    ssh: SSHSettings | None = None,
    grace: float | None = None,
    spec_name: str = "",
) -> None:
    """Sweep the daemon ``key`` (its port host) in a thread, the first time per process
    (``grace`` and ``spec_name``: a server's adoption grace, see :func:`sweep_orphans`)."""
    with _SWEPT_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    threading.Thread(
        target=_sweep_quietly,
        args=(docker_host, timeout, log, ssh, grace, spec_name),
        name="docker-orphan-sweep",
        daemon=True,
    ).start()


def parse_ports_label(text: str) -> set[int]:
    """The ports in a ``cluster-provisioners.connection.ports`` label (``"p1,p2,..."``)."""
    return {int(p) for p in text.split(",") if p.strip().isdigit()}


class DockerPortSource(PortSource):
    """Ports held on a daemon: those labelled on our containers and all published ones."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    def ports_in_use(self, host: str) -> set[int]:
        try:
            items = self.client.api.containers(all=True)
        except ENGINE_ERRORS as exc:
            msg = f"cannot list the containers of Docker host {host!r}: {exc}"
            raise KernelStartError(msg, target="docker") from exc
        held: set[int] = set()
        for item in items:
            labels = item.get("Labels") or {}
            if labels.get(LABEL_MANAGED_BY) == MANAGED_BY:
                held |= parse_ports_label(labels.get(LABEL_PORTS, ""))
            held |= {int(p["PublicPort"]) for p in item.get("Ports") or [] if p.get("PublicPort")}
        return held


def parse_gpus(text: str) -> list[docker.types.DeviceRequest]:
    """Device requests for ``gpus`` ('' | 'all' | 'N' | 'device=0,1'), as ``docker --gpus``."""
    if not text:
        return []
    if text == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if text.isdigit():
        return [docker.types.DeviceRequest(count=int(text), capabilities=[["gpu"]])]
    ids = text.removeprefix("device=").split(",")
    return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


def listed_kernel_id(labels: Mapping[str, str], name: str) -> tuple[str, bool]:
    """``(kernel id, still warm)`` of a kernel container from its labels and name.

    A warm kernel's container keeps the labels of its pool id; its claim renames it to
    ``<prefix><kernel id>-<hex>``, so the id it serves under is in its name.
    """
    kernel_id = labels.get(LABEL_KERNEL_ID, "?")
    prefix = labels.get(LABEL_POOL_PREFIX)
    if prefix is None:
        return kernel_id, False
    stem = name.lstrip("/")
    if stem.startswith(prefix) and "-" in stem[len(prefix) :]:
        named = stem[len(prefix) :].rsplit("-", 1)[0]
        if named != kernel_id:
            return named, False
    return kernel_id, True


def kernel_labels(
    extra: Mapping[str, str],
    kernel_id: str,
    owner: str,
    ports: Sequence[int],
    kernelspec: str,
    persist_grace: float | None = None,
    username: str = "",
) -> dict[str, str]:
    """The kernel container's labels: ``extra``, then ours; with ``persist_grace`` (the
    ``adoption_grace`` of a kernel started with ``persist_kernels``) the persist marker;
    with ``username`` the kernel's user."""
    labels = dict(extra)
    if username:
        labels[LABEL_USERNAME] = username
    if persist_grace is not None:
        labels.update({LABEL_PERSIST: "true", LABEL_GRACE: f"{persist_grace:g}"})
    labels.update(
        {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_KERNEL_ID: kernel_id,
            LABEL_OWNER: owner,
            LABEL_PORTS: ",".join(map(str, ports)),
            LABEL_KERNELSPEC: kernelspec,
        }
    )
    return labels


def create_args(
    image: str,
    command: Sequence[str],
    name: str,
    environment: Mapping[str, str],
    labels: Mapping[str, str],
    *,
    publish: tuple[str, Sequence[int]] | None = None,
    network: str = "",
    volumes: Sequence[str] = (),
    mounts: Sequence[Mapping[str, Any]] = (),
    working_dir: str = "",
    user: str = "",
    cpu_limit: float = 0.0,
    memory_limit: str = "",
    gpus: str = "",
    cap_drop: Sequence[str] = (),
    cap_add: Sequence[str] = (),
    no_new_privileges: bool = False,
    pids_limit: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``containers.create`` (no I/O).

    ``publish`` is (ip, ports): each port published on the same host port of ip; unset
    options are left out; ``extra`` overrides everything.
    """
    args: dict[str, Any] = {
        "image": image,
        "command": list(command),
        "name": name,
        "environment": dict(environment),
        "labels": dict(labels),
        "detach": True,
    }
    if publish is not None:
        ip, ports = publish
        args["ports"] = {f"{p}/tcp": (ip, p) for p in ports}
    optional = {
        "network": network,
        "volumes": list(volumes),
        "mounts": [dict(m) for m in mounts],
        "working_dir": working_dir,
        "user": user,
        "nano_cpus": int(cpu_limit * 1e9),
        "mem_limit": memory_limit,
        "device_requests": parse_gpus(gpus),
        "cap_drop": list(cap_drop),
        "cap_add": list(cap_add),
        "security_opt": ["no-new-privileges:true"] if no_new_privileges else [],
        "pids_limit": pids_limit,
    }
    args.update({k: v for k, v in optional.items() if v})
    args.update(extra or {})
    return args


def connection_archive(dirname: str, content: bytes, uid: int, gid: int) -> bytes:
    """A tar of ``dirname/`` (0700) holding ``connection.json`` (0600), owned by uid:gid.

    The file is writable by its owner on purpose: ipykernel rewrites its connection file
    at start and exits on a read-only one.
    """
    now = time.time()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(dirname)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        entry = tarfile.TarInfo(f"{dirname}/connection.json")
        entry.size, entry.mode = len(content), 0o600
        for info in (folder, entry):
            info.uid, info.gid, info.mtime = uid, gid, now
        tar.addfile(folder)
        tar.addfile(entry, io.BytesIO(content))
    return buf.getvalue()


def lookup_id(table: bytes, name: str) -> tuple[int, int] | None:
    """(id, primary gid) of ``name`` in an /etc/passwd or /etc/group text."""
    for line in table.decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            gid = fields[3] if len(fields) > 3 and fields[3].isdigit() else fields[2]
            return int(fields[2]), int(gid)
    return None


def signal_number(name: str | None) -> signal.Signals:
    """The signal named ``name`` ('SIGQUIT', 'QUIT' or '3'); SIGTERM when unknown."""
    text = (name or "").upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        return signal.SIGTERM


def host_path_of(
    path: str, volumes: Sequence[str], mounts: Sequence[dict[str, Any]], working_dir: str = ""
) -> str | None:
    """The existing host file a container sees at ``path`` through a bind mount, or None.

    ``volumes`` are 'SOURCE:TARGET[:MODE]' strings and ``mounts`` Docker API mounts; only
    binds of absolute host paths count. A relative ``path`` is taken from
    ``working_dir`` (None without it); ``..`` never leaves a mount.
    """
    if path.startswith("~"):
        return None
    if not path.startswith("/"):
        if not working_dir:
            return None
        path = posixpath.join(working_dir, path)
    path = posixpath.normpath(path)
    binds = [(v.split(":")[0], v.split(":")[1]) for v in volumes if v.startswith("/")]
    binds += [
        (str(m["Source"]), str(m["Target"]))
        for m in mounts
        if m.get("Type") == "bind" and str(m.get("Source", "")).startswith("/")
    ]
    for source, target in sorted(binds, key=lambda bind: len(bind[1]), reverse=True):
        inside = posixpath.relpath(path, posixpath.normpath(target))
        if inside == ".." or inside.startswith("../"):
            continue
        local = Path(source, inside).resolve()
        return local.as_posix() if local.exists() else None
    return None

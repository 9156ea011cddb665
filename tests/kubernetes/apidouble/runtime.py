"""The double's container runtime: docker containers and volumes for pods.

Every docker call is blocking, so it runs in a thread pool; the futures of calls made for
a pod are tracked so a pod's teardown can wait for in-flight creates before sweeping.
Container deaths arrive through one docker events stream. Pods run on a bridge network
of the double's own, where each new pod gets an address no recent pod had, as on a real
cluster (:meth:`DockerRuntime.pod_address`). Every container, volume and that network is
labelled with the double's instance id (and the pod uid), so teardown and leftover checks
find them all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import io
import ipaddress
import os
import random
import socket
import tarfile
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
from docker.types import IPAMConfig, IPAMPool, Mount

LABEL = "cluster-provisioners.k8s-double"
LABEL_POD_UID = f"{LABEL}.pod-uid"
LABEL_POD = f"{LABEL}.pod"
LABEL_NAMESPACE = f"{LABEL}.namespace"
LABEL_CONTAINER = f"{LABEL}.container"
LABEL_ROLE = f"{LABEL}.role"
LABEL_OWNER = f"{LABEL}.owner"
VOLUME_ROOT = "/.k8s-double/volumes"
_CLONE_NEWNET = 0x40000000
#: Where each double's pod network (a /24) is taken from; Docker refuses a subnet that
#: overlaps one of its networks, and the next is tried.
POD_SUBNETS = "10.213.0.0/16"

T = TypeVar("T")


@dataclass
class VolumePlan:
    """A pod volume backed by a docker volume (``tmpfs`` for memory and secret volumes)."""

    name: str
    docker_name: str
    kind: str  # emptyDir | secret | configMap | persistentVolumeClaim
    tmpfs: bool
    size: str | None = None


@dataclass
class Sandbox:
    """The pod's pause container: it owns the network/IPC namespaces and holds volumes."""

    id: str
    ip: str
    pid: int
    host_network: bool


class DockerRuntime:
    """Docker calls for one double instance (``instance`` labels everything it creates)."""

    def __init__(self, instance: str, helper_image: str) -> None:
        self.instance = instance
        self.helper_image = helper_image
        self.owner = process_identity(os.getpid()) or ""
        self.client = docker.from_env(timeout=180)
        self.pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="k8s-double")
        self.inflight: dict[str, set[concurrent.futures.Future[Any]]] = defaultdict(set)
        self._exits: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._resolving: set[asyncio.Future[None]] = set()
        self._events: Any = None
        self._events_thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.network = f"k8s-double-{instance}"
        self._net_lock = threading.Lock()
        self._pod_ips: list[str] = []  # the pod network's addresses, in the order handed out
        self._next_ip = 0

    # -- plumbing ------------------------------------------------------------------------
    async def call(self, owner: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking ``fn`` in the pool, tracked under ``owner`` (a pod uid)."""
        future = self.pool.submit(fn, *args, **kwargs)
        if owner:
            self.inflight[owner].add(future)
            future.add_done_callback(lambda f: self.inflight[owner].discard(f))
        return await asyncio.wrap_future(future)

    async def settle(self, owner: str) -> None:
        """Wait until every docker call made for ``owner`` has returned."""
        pending = list(self.inflight.get(owner, ()))
        if pending:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: concurrent.futures.wait(pending, timeout=120)
            )
        self.inflight.pop(owner, None)

    def labels(
        self, uid: str, namespace: str, pod: str, role: str, container: str = ""
    ) -> dict[str, str]:
        return {
            LABEL: self.instance,
            LABEL_OWNER: self.owner,
            LABEL_POD_UID: uid,
            LABEL_NAMESPACE: namespace,
            LABEL_POD: pod,
            LABEL_ROLE: role,
            LABEL_CONTAINER: container,
        }

    def claim_labels(self, namespace: str) -> dict[str, str]:
        """Labels of a claim's docker volume: this double's, no pod's (it outlives pods)."""
        return {
            LABEL: self.instance,
            LABEL_OWNER: self.owner,
            LABEL_NAMESPACE: namespace,
            LABEL_ROLE: "claim",
        }

    def start_events(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow docker 'die' events of our containers and resolve exit waiters."""
        self.loop = loop
        self._events = self.client.events(
            decode=True,
            filters={"type": "container", "event": "die", "label": f"{LABEL}={self.instance}"},
        )

        def follow() -> None:
            with contextlib.suppress(Exception):
                for event in self._events:
                    cid = event.get("id") or (event.get("Actor") or {}).get("ID")
                    if cid:
                        loop.call_soon_threadsafe(self._on_die, cid)

        self._events_thread = threading.Thread(target=follow, name="k8s-double-events", daemon=True)
        self._events_thread.start()

    def _on_die(self, cid: str) -> None:
        waiter = self._exits.get(cid)
        if waiter is not None and not waiter.done():
            task = asyncio.ensure_future(self._resolve_exit(cid, waiter))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)

    async def _resolve_exit(self, cid: str, waiter: asyncio.Future[dict[str, Any]]) -> None:
        try:
            state = await self.call(None, self.state, cid)
        except Exception as exc:  # container removed under us
            state = {"ExitCode": 137, "Error": str(exc), "FinishedAt": None, "StartedAt": None}
        if not waiter.done():
            waiter.set_result(state)

    def expect_exit(self, cid: str) -> asyncio.Future[dict[str, Any]]:
        """A future resolved with the container's docker State when it dies."""
        assert self.loop is not None
        waiter = self._exits.get(cid)
        if waiter is None:
            waiter = self.loop.create_future()
            self._exits[cid] = waiter
            waiter.add_done_callback(lambda _f: self._exits.pop(cid, None))
        return waiter

    def close(self) -> None:
        """Stop following events, remove everything labelled with our instance."""
        if self._events is not None:
            with contextlib.suppress(Exception):
                self._events.close()
        self.sweep()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.client.close()

    # -- blocking operations (called through ``call``) ------------------------------------
    def image(self, ref: str) -> tuple[str, int, dict[str, Any]] | None:
        """(image id, size, config) of a locally present image, or None. Never pulls."""
        try:
            img = self.client.images.get(ref)
        except (docker.errors.ImageNotFound, docker.errors.APIError):
            return None
        return img.id, int(img.attrs.get("Size") or 0), dict(img.attrs.get("Config") or {})

    def create_volume(self, plan: VolumePlan, labels: dict[str, str]) -> None:
        opts = None
        if plan.tmpfs:
            opts = {"type": "tmpfs", "device": "tmpfs", "o": "mode=1777"}
            if plan.size:
                opts["o"] += f",size={plan.size}"
        self.client.volumes.create(
            plan.docker_name,
            driver="local",
            driver_opts=opts,
            labels={LABEL_ROLE: "volume", **labels},
        )

    def volume_path(self, docker_name: str) -> str:
        return str(self.client.volumes.get(docker_name).attrs["Mountpoint"])

    def run_sandbox(
        self,
        name: str,
        hostname: str,
        labels: dict[str, str],
        volumes: list[VolumePlan],
        host_network: bool,
        fs_group: int | None,
        ports: dict[str, Any],
    ) -> Sandbox:
        """Start the pause container with every volume mounted under VOLUME_ROOT."""
        script = []
        for vol in volumes:
            path = f"{VOLUME_ROOT}/{vol.name}"
            writable = vol.kind in ("emptyDir", "persistentVolumeClaim")
            mode = "0777" if writable else "1777"
            if fs_group is not None:
                script.append(f"chgrp {fs_group} '{path}'")
                mode = "2777" if writable else "3777"
            script.append(f"chmod {mode} '{path}'")
        script.append("exec sleep infinity")
        kwargs: dict[str, Any] = {
            "entrypoint": ["/bin/sh", "-c"],
            "command": ["; ".join(script)],
            "name": name,
            "labels": labels,
            "detach": True,
            "ipc_mode": "shareable",
            "mounts": [
                Mount(f"{VOLUME_ROOT}/{v.name}", v.docker_name, type="volume") for v in volumes
            ],
            "user": "0:0",
        }
        if host_network:
            kwargs["network_mode"] = "host"
            container = self.client.containers.run(self.helper_image, **kwargs)
        else:
            kwargs["hostname"] = hostname
            if ports:
                kwargs["ports"] = ports
            container = self._run_on_pod_network(kwargs)
        container.reload()
        net = container.attrs["NetworkSettings"]
        ip = net.get("IPAddress") or next(
            (
                n.get("IPAddress")
                for n in (net.get("Networks") or {}).values()
                if n.get("IPAddress")
            ),
            "",
        )
        return Sandbox(container.id, ip, int(container.attrs["State"]["Pid"]), host_network)

    def pod_address(self) -> str:
        """The next address of the pod network (created on first use).

        Docker's own bridge gives a new container the lowest free address, so a pod made
        once another was removed got its IP: a real cluster's CNI gives each new pod an
        address of its own. Addresses are handed out in turn, wrapping around the /24.
        """
        with self._net_lock:
            if not self._pod_ips:
                self._create_pod_network()
            ip = self._pod_ips[self._next_ip % len(self._pod_ips)]
            self._next_ip += 1
            return ip

    def _create_pod_network(self) -> None:
        subnets = list(ipaddress.ip_network(POD_SUBNETS).subnets(new_prefix=24))
        random.shuffle(subnets)
        labels = {LABEL: self.instance, LABEL_OWNER: self.owner, LABEL_ROLE: "network"}
        for subnet in subnets[:20]:
            hosts = [str(ip) for ip in subnet.hosts()]
            pool = IPAMPool(subnet=str(subnet), gateway=hosts[0])
            try:
                self.client.networks.create(
                    self.network,
                    driver="bridge",
                    ipam=IPAMConfig(pool_configs=[pool]),
                    labels=labels,
                )
            except docker.errors.APIError as exc:
                if "overlap" in str(exc).lower():
                    continue
                raise
            self._pod_ips = hosts[1:]
            return
        raise RuntimeError(f"no free /24 of {POD_SUBNETS} for the double's pod network")

    def _run_on_pod_network(self, kwargs: dict[str, Any]) -> Any:
        """Run the pause container on the pod network at the next free address."""
        for _ in range(8):
            endpoint = self.client.api.create_endpoint_config(ipv4_address=self.pod_address())
            try:
                return self.client.containers.run(
                    self.helper_image,
                    network=self.network,
                    networking_config={self.network: endpoint},
                    **kwargs,
                )
            except docker.errors.APIError as exc:  # still held by a pod of ours
                if "already in use" not in str(exc) or "ddress" not in str(exc):
                    raise
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    self.client.containers.get(kwargs["name"]).remove(force=True)
        raise RuntimeError("no free address on the double's pod network")

    def put_files(self, container_id: str, path: str, archive: bytes) -> None:
        self.client.api.put_archive(container_id, path, archive)

    def create_container(self, image: str, **kwargs: Any) -> str:
        return self.client.containers.create(image, **kwargs).id

    def start(self, cid: str) -> None:
        self.client.api.start(cid)

    def state(self, cid: str) -> dict[str, Any]:
        return dict(self.client.api.inspect_container(cid)["State"])

    def stop(self, cid: str, grace: int) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.client.api.stop(cid, timeout=max(grace, 0))

    def kill(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.client.api.kill(cid)

    def remove_container(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.client.api.remove_container(cid, force=True)

    def read_file(self, cid: str, path: str, limit: int) -> bytes:
        """A file's content from a (stopped) container, or b"" if absent."""
        try:
            stream, _ = self.client.api.get_archive(cid, path)
        except (docker.errors.NotFound, docker.errors.APIError):
            return b""
        raw = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    handle = tar.extractfile(member)
                    return handle.read(limit) if handle else b""
        return b""

    def logs(self, cid: str, **kwargs: Any) -> Any:
        return self.client.api.logs(cid, stdout=True, stderr=True, **kwargs)

    def remove_pod(self, uid: str) -> None:
        """Remove every container, then every volume, of pod ``uid``."""
        selector = {"label": [f"{LABEL}={self.instance}", f"{LABEL_POD_UID}={uid}"]}
        for container in self.client.containers.list(all=True, filters=selector):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        for volume in self.client.volumes.list(filters=selector):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)

    def remove_role(self, uid: str, role: str) -> None:
        """Remove pod ``uid``'s containers of one role (e.g. a half-made pause)."""
        selector = {"label": [f"{LABEL_POD_UID}={uid}", f"{LABEL_ROLE}={role}"]}
        for container in self.client.containers.list(all=True, filters=selector):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)

    def sweep_orphans(self) -> list[str]:
        """Remove containers/volumes of doubles whose test process died without teardown
        (killed runs); doubles of live processes are left alone. Returns what went."""
        removed = []
        for container in self.client.containers.list(all=True, filters={"label": LABEL}):
            owner = container.labels.get(LABEL_OWNER, "")
            if owner and not _alive(owner):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
                    removed.append(f"container {container.name}")
        for volume in self.client.volumes.list(filters={"label": LABEL}):
            owner = (volume.attrs.get("Labels") or {}).get(LABEL_OWNER, "")
            if owner and not _alive(owner):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    volume.remove(force=True)
                    removed.append(f"volume {volume.name}")
        for network in self.client.networks.list(filters={"label": LABEL}):
            owner = (network.attrs.get("Labels") or {}).get(LABEL_OWNER, "")
            if owner and not _alive(owner):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    network.remove()
                    removed.append(f"network {network.name}")
        return removed

    def sweep(self) -> None:
        """Remove everything this instance created."""
        selector = {"label": f"{LABEL}={self.instance}"}
        with contextlib.suppress(Exception):
            for container in self.client.containers.list(all=True, filters=selector):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
            for volume in self.client.volumes.list(filters=selector):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    volume.remove(force=True)
            for network in self.client.networks.list(filters=selector):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    network.remove()

    def leftovers(self, live_uids: set[str]) -> list[str]:
        """Containers and volumes of ours whose pod no longer exists in the API."""
        selector = {"label": f"{LABEL}={self.instance}"}
        found = []
        for container in self.client.containers.list(all=True, filters=selector):
            if container.labels.get(LABEL_POD_UID) not in live_uids:
                found.append(f"container {container.name}")
        for volume in self.client.volumes.list(filters=selector):
            labels = volume.attrs.get("Labels") or {}
            if labels.get(LABEL_ROLE) == "claim":
                continue  # a claim's: it outlives every pod (removed with the double)
            if labels.get(LABEL_POD_UID) not in live_uids:
                found.append(f"volume {volume.name}")
        return found

    # -- exec ------------------------------------------------------------------------------
    def exec_open(
        self, cid: str, cmd: list[str], stdin: bool, tty: bool
    ) -> tuple[str, socket.socket]:
        """Create and start a docker exec; return its id and raw socket."""
        exec_id = self.client.api.exec_create(
            cid, cmd, stdout=True, stderr=True, stdin=stdin, tty=tty
        )["Id"]
        sock = self.client.api.exec_start(exec_id, socket=True, tty=tty)
        raw = getattr(sock, "_sock", sock)
        return exec_id, raw

    def exec_exit_code(self, exec_id: str) -> int | None:
        return self.client.api.exec_inspect(exec_id).get("ExitCode")

    def exec_resize(self, exec_id: str, height: int, width: int) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.exec_resize(exec_id, height=height, width=width)


def process_identity(pid: int) -> str | None:
    """``pid:starttime`` (from /proc), stable for the life of the process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return f"{pid}:{fields[19]}"


def _alive(owner: str) -> bool:
    pid = owner.split(":", 1)[0]
    return pid.isdigit() and process_identity(int(pid)) == owner


def connect_in_netns(pid: int, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect to 127.0.0.1:``port`` inside the network namespace of process ``pid``
    (what the container runtime does for a port-forward). Runs in a dedicated thread that
    ends afterwards, so a foreign namespace can never leak into a pooled thread."""
    result: dict[str, Any] = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except OSError as exc:  # the pod's process is gone (deleted, restarting)
            os.close(own)
            result["error"] = exc
            return
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the pod network namespace failed")
            try:
                result["sock"] = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            finally:
                libc.setns(own, _CLONE_NEWNET)
        except OSError as exc:
            result["error"] = exc
        finally:
            os.close(target)
            os.close(own)

    thread = threading.Thread(target=work, name="k8s-double-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]

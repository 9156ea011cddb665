"""The Docker engine: one kernel in a container of any image with a stock kernel.

The kernelspec's argv (or ``command``) runs as the container's command; its connection
file is copied into the created container with ``put_archive`` before it starts, so
nothing on the server's filesystem is needed and a remote daemon works too. The five
kernel ports are published on ``publish_ip`` (host ports from the cluster-aware cache,
cross-checked against the ports our containers on that daemon hold), or, with
``connect_via_container_ip``, reached on the container's own IP: through local relays
that follow the kernel to its next container on a restart (``container_ip_relay``; a new
container has a new IP). Daemon access outside a kernel's lifecycle lives in
:mod:`.daemon`, the settings in :mod:`.settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import posixpath
import secrets
import signal
import time
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

import docker

from ..connection.files import connection_file_content
from ..connection.ports import LOCAL_HOST, PortSource, zmq_listens
from ..connection.readiness import wait_until_listening
from ..connection.relay import KernelRelay, RelayLoop
from ..connection.sshconnect import SSHSettings, format_server
from ..connection.sshlink import SSH_EXECUTOR, SSHLink
from ..connection.sshprobe import forwarded_zmq_listens
from ..exceptions import (
    EngineUnavailableError,
    ForwardingRefusedError,
    KernelStartError,
    ProvisionerError,
)
from ..executor import EngineExecutor
from ..lifecycle.engine import PORT_NAMES, Engine, kernel_row
from ..lifecycle.failed_start import exited_while_starting
from ..lifecycle.fallback import while_unreachable
from ..lifecycle.owner import detached_mark
from ..parameters import encode_launch_env
from ..podenv import maybe_in_pod
from ..usernames import UsernameError, check_username, expand_env, expand_username
from .daemon import (
    ENGINE_ERRORS,
    LABEL_KERNELSPEC,
    LABEL_LAUNCH_ENV,
    LABEL_MANAGED_BY,
    LABEL_POOL_PREFIX,
    MANAGED_BY,
    UNSAFE_NAME,
    DockerPortSource,
    adoptable_containers,
    connection_archive,
    container_kernel_dir,
    create_args,
    current_owner,
    current_username,
    host_path_of,
    is_local_daemon,
    kernel_labels,
    listed_kernel_id,
    lookup_id,
    ping,
    read_file,
    signal_number,
    sweep_once,
    sweep_orphans,
    write_owner,
    write_user,
)
from .pull import PullProgress, stream_pull
from .shared import SharedDaemon

if TYPE_CHECKING:
    from .provisioner import DockerClusterProvisioner

#: Every blocking docker-py call of the Docker target runs here (see provisioners.executor).
DOCKER_EXECUTOR = EngineExecutor("docker", max_workers=8)

#: Seconds after a container's start by which docker-proxy's retried dial has reached
#: the kernel (a TCP SYN retransmission is 1 s).
_PROXY_SETTLE = 1.3
#: Seconds a running container may go without an IP on its network before the start
#: fails (``connect_via_container_ip``).
_IP_GRACE = 10.0


class DockerEngine(Engine):
    """One kernel in a Docker container; its settings are a ``DockerClusterProvisioner``'s.

    Holds the container (id, name, IP), the docker-py client of its daemon (shared by
    every kernel of this process on that daemon: :mod:`.shared`) and, in container-IP
    mode, the relay that clients reach it through.
    """

    target: ClassVar[str] = "docker"
    executor: ClassVar[EngineExecutor] = DOCKER_EXECUTOR
    settings: DockerClusterProvisioner

    def __init__(self, settings: DockerClusterProvisioner, kernel_id: str) -> None:
        super().__init__(settings, kernel_id)
        self.container_id = ""
        self.container_name = ""
        self.container_ip = ""
        #: The docker-py client of the kernel's daemon (None until the first call), the
        #: client of :attr:`shared_daemon`.
        self.client: docker.DockerClient | None = None
        #: The daemon's shared client and event cache this engine holds a reference to.
        self.shared_daemon: SharedDaemon | None = None
        #: Container-IP mode: the local listeners clients reach the kernel through.
        self.relay: KernelRelay | None = None
        #: The daemon a reattached kernel runs on, from its saved state (None: settings').
        self._saved_host: str | None = None
        #: The kernel id the container was created for (its kernel dir's name).
        self._dir_id = ""
        self._started_at = 0.0
        self._daemon_key = ""
        self._pending_create: asyncio.Future[Any] | None = None
        self._stop_signal = signal.SIGTERM

    # ------------------------------------------------------------------ the daemon

    @property
    def docker_host(self) -> str:
        """URL of the kernel's daemon ('' for DOCKER_HOST or the local socket)."""
        return self.settings.docker_host if self._saved_host is None else self._saved_host

    def is_local_daemon(self) -> bool:
        """True when the kernel's daemon runs on this machine."""
        return is_local_daemon(self.docker_host)

    async def _docker(self) -> docker.DockerClient:
        if self.client is None:
            shared = await self.executor.run(
                SharedDaemon.acquire,
                self.docker_host,
                timeout=self.settings.api_timeout,
                connect_timeout=self.settings.connect_timeout,
                ssh=self.daemon_ssh_settings(),
            )
            if self.client is not None:  # another call of this engine acquired it first
                shared.release()
            else:
                self.shared_daemon, self.client = shared, shared.client
        return self.client

    def daemon_ssh_settings(self) -> SSHSettings | None:
        """For an ``ssh://`` daemon: our SSH settings for its host (key, password reference,
        ssh_known_hosts, host-key policy), never docker-py's ~/.ssh defaults."""
        url = urlparse(self.docker_host)
        if url.scheme != "ssh" or not url.hostname:
            return None
        server = format_server(url.username or getpass.getuser(), url.hostname, url.port or 22)
        return self.settings.ssh_settings(server)

    def _close_client(self) -> None:
        """Let go of the daemon's shared client (closed by its last user)."""
        shared, self.shared_daemon, self.client = self.shared_daemon, None, None
        if shared is not None:
            if self.container_id:
                shared.forget(self.container_id)
            shared.release()

    def _host_key(self, client: docker.DockerClient) -> str:
        """'localhost' for a daemon of this machine, else 'docker:<daemon id>'."""
        if self.is_local_daemon():
            return LOCAL_HOST
        return f"docker:{client.info()['ID']}"

    def _failed(self, msg: str) -> KernelStartError:
        return KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)

    # ------------------------------------------------------------------ hooks

    async def check_engine(self) -> None:
        """Raise :class:`EngineUnavailableError` when the daemon does not answer its ping
        within ``connect_timeout`` (the client is then closed)."""
        client = await self._docker()
        try:
            await self.executor.run(ping, client, self.settings.connect_timeout)
            self._daemon_key = await self.executor.run(self._host_key, client)
        except ENGINE_ERRORS as exc:
            if self.shared_daemon is not None:
                self.shared_daemon.invalidate()  # the next start connects anew
            self._close_client()
            msg = f"Docker daemon {self.docker_host or '(local)'} is unreachable: {exc}"
            raise EngineUnavailableError(msg, target=self.target) from exc

    async def start_given_up(self) -> None:
        """Close the daemon's client :meth:`check_engine` opened (a later start opens
        another). Never raises."""
        try:
            self._close_client()
        except Exception as exc:  # a client that fails to close is dropped anyway
            self.client = self.shared_daemon = None
            self.log.debug("Kernel %s: closing the Docker client: %s", self.kernel_id, exc)

    async def preflight(self) -> list[str]:
        """Warn when the daemon is unreachable or the image is missing; never raises."""
        image, policy = self.settings.image, self.settings.pull_policy
        where = self.docker_host or "the local Docker daemon"
        try:
            await self.check_engine()
            client = await self._docker()
            await self.executor.run(client.images.get, image)
        except EngineUnavailableError as exc:
            settings = self.settings
            consequence = while_unreachable(
                settings.fallback, settings.fallback_in_pod, maybe_in_pod()
            )
            return [f"{exc}; {consequence}"]
        except docker.errors.ImageNotFound:
            if policy != "never":
                return [
                    f"image {image!r} is not on {where} yet; it is pulled at the first "
                    f"start (pull_policy={policy!r}), which makes that start slow"
                ]
            return [
                f"image {image!r} is not present on {where} and pull_policy='never': "
                f"kernels will not start until you 'docker pull {image}' (or build it) "
                "there, or set pull_policy to 'if-missing'"
            ]
        except ENGINE_ERRORS as exc:
            return [f"cannot check image {image!r} on {where}: {exc}"]
        finally:
            self._close_client()
        return []

    def allocation_host(self) -> str:
        """This machine for a local daemon, else ``docker:<daemon id>``."""
        return self._daemon_key or LOCAL_HOST

    def port_sources(self) -> list[PortSource]:
        """The ports our containers on the daemon hold, and all it publishes."""
        return [DockerPortSource(self.client)] if self.client is not None else []

    def kernel_bind_ip(self) -> str:
        return "0.0.0.0"

    def reached_on_own_ports(self) -> bool:
        return not self.settings.connect_via_container_ip  # published ports: same address

    def server_path(self, path: str) -> str | None:
        """A container path under a bind mount of a local daemon, as the server's file."""
        if not self.is_local_daemon():
            return None
        try:
            volumes, mounts, working_dir = self.user_mounts(self.settings.username)
        except UsernameError:
            return None
        return host_path_of(path, volumes, mounts, working_dir)

    def kernel_connection_file(self) -> str:
        return posixpath.join(container_kernel_dir(self.kernel_id), "connection.json")

    def relays_container_ip(self) -> bool:
        """True when clients reach the container's IP through local relays (see
        ``container_ip_relay``); SSH tunnels keep their local ports by themselves."""
        settings = self.settings
        return (
            settings.connect_via_container_ip
            and settings.container_ip_relay
            and not settings.ssh_server
        )

    async def kernel_address(self) -> tuple[str, dict[str, int]]:
        """The published ports' address, the container's IP, or its relay's listeners.

        Raises :class:`~provisioners.exceptions.TunnelError` when the relay cannot listen.
        """
        ip, ports = self._direct_address()
        if not ip or not self.relays_container_ip():
            return ip, ports
        if self.relay is None:
            self.relay = self.settings.kernel_relay(
                self.executor, self.settings.api_timeout, RelayLoop
            )
        return await self.relay.follow(ip, ports, f"container {self.container_name}")

    def _direct_address(self) -> tuple[str, dict[str, int]]:
        """Where the kernel itself listens, as this server reaches it without relays
        (the container's IP is '' until it is known)."""
        settings = self.settings
        ports = {name: int(self.kernel_info[name]) for name in PORT_NAMES}
        if settings.connect_via_container_ip:
            return self.container_ip, ports
        if settings.publish_ip not in ("0.0.0.0", "::"):
            return settings.publish_ip, ports
        if self.is_local_daemon():
            return "127.0.0.1", ports
        return urlparse(self.docker_host).hostname or "127.0.0.1", ports

    # ------------------------------------------------------------------ start

    def user_mounts(self, username: str) -> tuple[list[str], list[dict[str, Any]], str]:
        """``volumes``, ``mounts`` and ``working_dir`` with ``{username}`` expanded for
        ``username`` (as a path segment, a valid volume name too). Raises
        :class:`UsernameError` naming the setting that uses it when there is no user."""
        s = self.settings
        volumes = expand_username(list(s.volumes), username, "path", setting="volumes")
        mounts = expand_username([dict(m) for m in s.mounts], username, "path", setting="mounts")
        working_dir = expand_username(s.working_dir, username, "path", setting="working_dir")
        return volumes, mounts, working_dir

    def create_args(self, cmd: list[str], env: dict[str, str], name: str) -> dict[str, Any]:
        """Keyword arguments of ``containers.create`` for this kernel (no I/O); raises
        :class:`UsernameError` when a setting uses ``{username}`` and there is no user."""
        s = self.settings
        ports = [self.kernel_info[n] for n in PORT_NAMES]
        grace = s.adoption_grace if s.persist_kernels else None
        username = check_username(s.username or env.get("KERNEL_USERNAME", ""))
        volumes, mounts, working_dir = self.user_mounts(username)
        env = expand_env(env, s.env, username)
        labels = kernel_labels(
            s.labels, self.kernel_id, str(s.owner), ports, s.spec_name, grace, username
        )
        if self.pool_id:
            labels[LABEL_POOL_PREFIX] = s.name_prefix
        if launch_env := encode_launch_env(s.launch_parameters):
            labels[LABEL_LAUNCH_ENV] = launch_env
        return create_args(
            s.image,
            cmd,
            name,
            env,
            labels,
            publish=None if s.connect_via_container_ip else (s.publish_ip, ports),
            network=s.network,
            volumes=volumes,
            mounts=mounts,
            working_dir=working_dir,
            user=s.user,
            cpu_limit=s.cpu_limit,
            memory_limit=s.memory_limit,
            gpus=s.gpus,
            cap_drop=s.cap_drop,
            cap_add=s.cap_add,
            no_new_privileges=s.no_new_privileges,
            pids_limit=s.pids_limit,
            extra=s.extra_create_args,
        )

    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        """Create the container, copy the connection file in, start it and wait until the
        kernel's heartbeat speaks ZMTP. Raises :class:`KernelStartError` naming the image,
        the container and its last log lines when it exits;
        :class:`ForwardingRefusedError` when the SSH server refuses the probe's forward."""
        if kernel_info.get("transport", "tcp") != "tcp":
            raise self._failed("the docker target needs the tcp transport")
        image = self.settings.image
        client = await self._docker()
        self._maybe_sweep()
        if self.settings.pull_policy == "always":
            await self._pull(client)
        prefix = self.settings.name_prefix
        name = f"{prefix}{UNSAFE_NAME.sub('-', self.kernel_id)}-{secrets.token_hex(2)}"
        args = self.create_args(cmd, env, name)
        container = await self._create(client, args)
        self.container_id, self.container_name = container.id, name
        self._dir_id = self.kernel_id
        self.progress("container created", f"{name} from image {image}")
        self._pending_create = None
        self.started = True
        self._stop_signal = signal_number(container.attrs.get("Config", {}).get("StopSignal"))
        uid, gid = await self._owner_ids(container)
        conn_file = self.kernel_connection_file()
        folder = posixpath.dirname(conn_file)
        content = connection_file_content(kernel_info)
        archive = connection_archive(posixpath.basename(folder), content, uid, gid)
        try:
            await self.executor.run(container.put_archive, posixpath.dirname(folder), archive)
            await self.executor.run(container.start)
            self._started_at = time.monotonic()
        except ENGINE_ERRORS as exc:
            msg = f"container {name} from image {image!r} failed to start: {exc}"
            raise self._failed(msg) from exc
        self.progress("container started", f"{name} ({container.short_id})")
        await self._wait_until_listening(client)

    async def _create(self, client: docker.DockerClient, args: dict[str, Any]) -> Any:
        image, policy = self.settings.image, self.settings.pull_policy
        for attempt in range(2):
            # Shielded: if the start is cancelled (launch_timeout) while the daemon creates
            # the container, remove_kernel still learns its id from the pending call.
            self._pending_create = self.executor.submit(client.containers.create, **args)
            try:
                return await asyncio.shield(self._pending_create)
            except docker.errors.ImageNotFound as exc:
                if attempt or policy != "if-missing":
                    msg = (
                        f"image {image!r} is not present on the Docker daemon "
                        f"(pull_policy={policy!r}): {exc.explanation or exc}"
                    )
                    raise self._failed(msg) from exc
                await self._pull(client)
            except ENGINE_ERRORS as exc:
                msg = f"cannot create a container from image {image!r}: {exc}"
                raise self._failed(msg) from exc
        raise AssertionError("unreachable")

    async def _pull(self, client: docker.DockerClient) -> None:
        image = self.settings.image
        repository, tag = docker.utils.parse_repository_tag(image)
        self.progress("pulling image", image)
        loop = asyncio.get_running_loop()
        tracker = PullProgress(image)

        def on_event(event: dict[str, Any]) -> None:
            line = tracker.update(event)
            if line:
                loop.call_soon_threadsafe(self.progress, "pulling image", line)

        try:
            await self.executor.run(stream_pull, client, repository, tag or "latest", on_event)
        except ENGINE_ERRORS as exc:
            policy = self.settings.pull_policy
            msg = f"cannot pull image {image!r} (pull_policy={policy!r}): {exc}"
            raise self._failed(msg) from exc

    async def _owner_ids(self, container: Any) -> tuple[int, int]:
        """uid and gid the kernel runs as, so its connection file is its own."""
        user = container.attrs.get("Config", {}).get("User") or ""
        name, _, group = user.partition(":")
        if name in ("", "root", "0") and not group:
            return 0, 0
        uid = gid = None
        if name.isdigit():
            uid, gid = int(name), 0
        else:
            found = lookup_id(await self.executor.run(read_file, container, "/etc/passwd"), name)
            if found is not None:
                uid, gid = found
        if group.isdigit():
            gid = int(group)
        elif group:
            found = lookup_id(await self.executor.run(read_file, container, "/etc/group"), group)
            gid = found[0] if found else gid
        if uid is None:
            self.log.warning(
                "Kernel %s: user %r not found in the image; connection file owned by 1000",
                self.kernel_id,
                user,
            )
            uid = 1000
        return uid, 1000 if gid is None else gid

    async def _wait_until_listening(self, client: docker.DockerClient) -> None:
        """Wait until the kernel's heartbeat port speaks ZMTP; fail if the container exits.

        With ``ssh_server`` the heartbeat is probed through the SSH server, as the tunnels
        will reach it (an sshd refusing to forward fails the start by name). With
        ``connect_via_container_ip`` the container's IP is resolved first, also behind SSH.
        """
        started = time.monotonic()
        link: SSHLink | None = None

        async def listening() -> bool:
            nonlocal link
            if self.settings.connect_via_container_ip and not self.container_ip:
                try:
                    self.container_ip = await self._container_ip(client)
                except ENGINE_ERRORS as exc:
                    raise self._vanished(exc) from exc
            ip, ports = self._direct_address()
            if not ip:
                return False
            if not self.settings.ssh_server:
                return await zmq_listens(ip, ports["hb_port"])
            if link is None:
                link = await SSH_EXECUTOR.run(SSHLink.acquire, self.settings.ssh_settings())
            try:
                return bool(
                    await SSH_EXECUTOR.run(forwarded_zmq_listens, link, ip, ports["hb_port"], 1.0)
                )
            except ForwardingRefusedError as exc:
                exc.target, exc.kernel_id = self.target, self.kernel_id
                raise

        async def check_start() -> None:
            try:
                state = await self._state(client)
            except ENGINE_ERRORS as exc:
                raise self._vanished(exc) from exc
            if state.get("Status") not in ("created", "running", "restarting"):
                await self._raise_exited(client, state)
            if (
                not self._direct_address()[0]
                and time.monotonic() - started > _IP_GRACE
                and state.get("Running")
            ):
                raise self._failed(
                    f"container {self.container_name} has no IP address on network "
                    f"{self.settings.network or '(default)'}; connect_via_container_ip "
                    "needs one"
                )

        try:
            await wait_until_listening(listening, check_start)
        finally:
            if link is not None:
                await SSH_EXECUTOR.run(link.release)

    def _vanished(self, exc: Exception) -> KernelStartError:
        return self._failed(f"container {self.container_name} vanished while starting: {exc}")

    async def _container_ip(self, client: docker.DockerClient) -> str:
        attrs = await self.executor.run(client.api.inspect_container, self.container_id)
        networks = attrs.get("NetworkSettings", {}).get("Networks") or {}
        network = self.settings.network
        if network in networks:
            return networks[network].get("IPAddress") or ""
        return next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), "")

    async def _state(self, client: docker.DockerClient) -> dict[str, Any]:
        attrs = await self.executor.run(client.api.inspect_container, self.container_id)
        return dict(attrs.get("State") or {})

    async def _raise_exited(self, client: docker.DockerClient, state: dict[str, Any]) -> None:
        try:
            raw = await self.executor.run(client.api.logs, self.container_id, tail=20)
            logs = raw.decode(errors="replace").strip()
        except ENGINE_ERRORS as exc:
            logs = f"(logs unavailable: {exc})"
        error = f": {state['Error']}" if state.get("Error") else ""
        where = f"container {self.container_name}, image {self.settings.image!r}{error}"
        raise self._failed(exited_while_starting(state.get("ExitCode"), where, logs))

    def _maybe_sweep(self) -> None:
        if self.settings.sweep_on_start:
            sweep_once(
                self.allocation_host(),
                self.docker_host,
                self.settings.api_timeout,
                self.log,
                self.daemon_ssh_settings(),
                self.settings.adoption_grace,
                self.settings.spec_name,
            )

    async def sweep_orphans(self) -> list[str]:
        """Remove our containers on this daemon whose server process is gone; persisted
        ones are marked detached and removed only when ``adoption_grace`` (this
        kernelspec's; another's own) has passed unadopted (:func:`.daemon.sweep_orphans`).
        Raises the daemon's errors."""
        client = await self._docker()
        grace, spec_name = self.settings.adoption_grace, self.settings.spec_name
        try:
            removed = await self.executor.run(sweep_orphans, client, self.log, grace, spec_name)
        finally:
            if not self.container_id:  # a template: let go of the shared client
                self._close_client()
        return [f"container {container_id[:12]}" for container_id in removed]

    async def adoptable_kernels(self) -> list[dict[str, Any]]:
        """Running kernel containers of this kernelspec on this daemon, started with
        ``persist_kernels``, not warm, whose owner record is detached or names a server
        known to be gone; each with its own connection file (read from the container),
        ports, port host and the state :meth:`load_kernel_state` reattaches with. A template
        engine (no container of its own) closes its client after. Raises
        :class:`EngineUnavailableError` when the daemon cannot be reached or listed."""
        await self.check_engine()
        try:
            found = await self.executor.run(
                adoptable_containers, await self._docker(), self.settings.spec_name, self.log
            )
        except ENGINE_ERRORS as exc:
            msg = f"cannot list the kernel containers of {self.docker_host or '(local)'}: {exc}"
            raise EngineUnavailableError(msg, target=self.target) from exc
        finally:
            if not self.container_id:  # a template, asked every adopt_interval: let go
                self._close_client()
        records = []
        for item in found:
            info = item["kernel_info"]
            state = {
                "container_id": item["container_id"],
                "container_name": item["container_name"],
                "container_ip": self._listed_ip(item["networks"]),
                "docker_host": self.docker_host,
                "daemon_key": self._daemon_key,
                "dir_id": item["dir_id"],
            }
            records.append(
                {
                    "kernel_id": item["kernel_id"],
                    "kernel_info": info,
                    "ports": [int(info[name]) for name in PORT_NAMES],
                    "port_host": self.allocation_host(),
                    "state": state,
                    "username": item["username"],
                    "launch_env": item["launch_env"],
                }
            )
        return records

    def _listed_ip(self, networks: dict[str, str]) -> str:
        """The container's IP as :meth:`_container_ip` picks it ('' without container-IP
        mode: the state of a kernel reached on published ports has none)."""
        if not self.settings.connect_via_container_ip:
            return ""
        network = self.settings.network
        if network in networks:
            return networks[network]
        return next((ip for ip in networks.values() if ip), "")

    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernel containers on this daemon."""
        client = await self._docker()
        try:
            found = await self.executor.run(
                client.api.containers,
                all=True,
                filters={"label": f"{LABEL_MANAGED_BY}={MANAGED_BY}"},
            )
            owners = await self.executor.run(
                lambda: [current_owner(client, item) for item in found]
            )
            users = await self.executor.run(
                lambda: [current_username(client, item) for item in found]
            )
        finally:
            if not self.container_id:  # a template: let go of the shared client
                self._close_client()
        rows = []
        for item, owner, user in zip(found, owners, users, strict=True):
            labels = item.get("Labels") or {}
            name = (item.get("Names") or ["/?"])[0].lstrip("/")
            kernel_id, warm = listed_kernel_id(labels, name)
            rows.append(
                kernel_row(
                    kernel_id,
                    target=self.target,
                    kernelspec=labels.get(LABEL_KERNELSPEC, ""),
                    where=f"container {name}",
                    state="warm"
                    if warm and item.get("State") == "running"
                    else item.get("State", ""),
                    owner=owner,  # a reattached or detached kernel's is in the container
                    created=float(item.get("Created") or 0),
                    container=item["Id"][:12],
                    username=user,
                )
            )
        return rows

    async def settle_clients(self) -> None:
        """docker-proxy accepts a client's reconnect once the container starts but may dial
        it before its network is up, then waits out a TCP SYN retransmission (1 s): a
        notebook's iopub reconnecting during a restart lost the output of a request sent
        at once. Report the restart done only after that."""
        settings = self.settings
        if settings.connect_via_container_ip or settings.ssh_server or not self._started_at:
            return
        wait = self._started_at + _PROXY_SETTLE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def claim_kernel(self, pool_id: str, username: str = "") -> None:
        """Rename the warm kernel's container after the kernel id it now serves and write
        ``username`` as its user (a label cannot be added: the file ``user`` next to its
        owner record); raises :class:`ProvisionerError` when the daemon refuses."""
        if not self.container_id:
            return
        client = await self._docker()
        if username:
            try:
                await self.executor.run(
                    write_user, client, self.container_id, self._dir_id, username
                )
            except ENGINE_ERRORS as exc:
                where = f"warm kernel container {self.container_name}"
                msg = f"cannot record user {username!r} in {where}: {exc}"
                raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        suffix = self.container_name.rsplit("-", 1)[-1]
        name = f"{self.settings.name_prefix}{UNSAFE_NAME.sub('-', self.kernel_id)}-{suffix}"
        try:
            await self.executor.run(client.api.rename, self.container_id, name)
        except ENGINE_ERRORS as exc:
            msg = f"cannot rename warm kernel container {self.container_name} to {name}: {exc}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self.container_name = name

    # ------------------------------------------------------------------ lifecycle

    async def poll_kernel(self) -> int | None:
        """None while the container is created, running, paused or restarting; its exit
        code once stopped, -1 once gone; None when the daemon cannot be asked.

        Answered from the daemon's event stream (:mod:`.shared`) while it vouches for the
        container; otherwise (stream down, first poll since it came up) by an inspect."""
        if not self.container_id or self.client is None:
            return 0
        container_id, shared = self.container_id, self.shared_daemon
        known = shared.cached_state(container_id) if shared is not None else None
        if known is None:
            token = shared.begin_check(container_id) if shared is not None else None
            try:
                state = await self._state(self.client)
            except docker.errors.NotFound:
                known = (False, -1)
            except ENGINE_ERRORS as exc:
                self.log.debug("Kernel %s: polling the container failed: %s", self.kernel_id, exc)
                return None
            else:
                running = state.get("Status") in ("created", "running", "paused", "restarting")
                known = (running, int(state.get("ExitCode") or 0))
            if shared is not None:
                shared.end_check(container_id, token, *known)
        running, code = known
        return None if running else code

    async def signal_kernel(self, signum: int) -> None:
        """Send ``signum`` to the container's PID 1 (the kernel); a container already gone
        or stopped is not an error; raises :class:`ProvisionerError` when the daemon
        refuses or cannot be reached."""
        if not self.container_id or self.client is None:
            return
        name = signal.Signals(signum).name
        try:
            await self.executor.run(self.client.api.kill, self.container_id, signal=name)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # not running
                return
            msg = f"cannot send {name} to container {self.container_name}: {exc}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        except ENGINE_ERRORS as exc:
            msg = f"cannot send {name} to container {self.container_name}: {exc}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc

    async def stop_kernel(self, force: bool) -> None:
        """The image's stop signal, as ``docker stop`` sends (jupyter_client waits, then
        kills); SIGKILL with ``force``. Raises as :meth:`signal_kernel`."""
        # (A kernel that is PID 1 ignores an unhandled SIGTERM.)
        await self.signal_kernel(signal.SIGKILL if force else self._stop_signal)

    async def remove_kernel(self, restart: bool) -> None:
        """Remove the container (and its anonymous volumes), also one whose creation was
        cancelled; raises :class:`ProvisionerError`, keeping its id, when the daemon cannot
        remove it after one retry. A full stop closes the client and the relay."""
        if self.relay is not None:
            await self.relay.pause()  # clients reconnect, and wait, until the next container
        pending, self._pending_create = self._pending_create, None
        if pending is not None and not self.container_id:
            with contextlib.suppress(Exception):
                timeout = self.settings.api_timeout
                self.container_id = (await asyncio.wait_for(pending, timeout)).id
        try:
            if self.container_id:  # raises, keeping the id, when the daemon cannot remove it
                await self._remove_container(await self._docker())
                if self.shared_daemon is not None:
                    self.shared_daemon.forget(self.container_id)
        finally:
            if not restart:
                self._close_client()
                if self.relay is not None:
                    relay, self.relay = self.relay, None
                    await relay.close()
        self.container_id = self.container_name = self.container_ip = ""
        self.started = False

    async def _remove_container(self, client: docker.DockerClient) -> None:
        """Remove the container (and its anonymous volumes); one retry, then raise."""
        for attempt in range(2):
            try:
                await self.executor.run(
                    client.api.remove_container, self.container_id, v=True, force=True
                )
            except docker.errors.NotFound:
                return
            except ENGINE_ERRORS as exc:
                if attempt:
                    daemon = self.docker_host or "(local)"
                    msg = f"cannot remove container {self.container_name} (daemon {daemon}): {exc}"
                    raise ProvisionerError(
                        msg, target=self.target, kernel_id=self.kernel_id
                    ) from exc
                await asyncio.sleep(0.5)
            else:
                self.log.debug("Kernel %s: container %s removed", self.kernel_id, self.container_id)
                return

    async def detach_kernel(self) -> None:
        """Write a detached mark as the container's owner record (the next server adopts
        it; sweeps wait ``adoption_grace``), then close this server's relay and client
        without stopping or removing the container. Raises :class:`ProvisionerError` when
        the daemon refuses the mark (the relay and client are closed all the same)."""
        try:
            if self.container_id:
                client = await self._docker()
                await self.executor.run(
                    write_owner, client, self.container_id, self._dir_id, detached_mark()
                )
                self.log.debug(
                    "Kernel %s: container %s marked detached", self.kernel_id, self.container_name
                )
        except ENGINE_ERRORS as exc:
            msg = f"cannot mark container {self.container_name} detached: {exc}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        finally:
            if self.relay is not None:
                relay, self.relay = self.relay, None
                await relay.close()
            self._close_client()

    def kernel_state(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "container_name": self.container_name,
            "container_ip": self.container_ip,
            "docker_host": self.docker_host,
            "daemon_key": self._daemon_key,
            "dir_id": self._dir_id,
        }

    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        """Reattach to the saved container, writing this server into it as its owner;
        raises :class:`ProvisionerError` when the daemon cannot inspect it (a container
        that is gone leaves no kernel)."""
        self._saved_host = state.get("docker_host", self.docker_host)
        self._daemon_key = state.get("daemon_key", "")
        self.container_id = state.get("container_id", "")
        self.container_name = state.get("container_name", "")
        self.container_ip = state.get("container_ip", "")
        self._dir_id = state.get("dir_id") or self.kernel_id
        self.started = False
        if not self.container_id:
            return
        client = await self._docker()
        try:
            current = await self._state(client)
        except docker.errors.NotFound:
            self.log.warning("Kernel %s: container %s is gone", self.kernel_id, self.container_name)
            self.container_id = ""
            return
        except ENGINE_ERRORS as exc:
            msg = f"cannot inspect container {self.container_name}: {exc}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self.started = True
        try:  # labels cannot change: sweeps read the new owner (over a detached mark) here
            await self.executor.run(
                write_owner, client, self.container_id, self._dir_id, str(self.settings.owner)
            )
        except ENGINE_ERRORS as exc:
            self.log.warning(
                "Kernel %s: cannot record this server as its owner in container %s: %s",
                self.kernel_id,
                self.container_name,
                exc,
            )
        if self.settings.connect_via_container_ip and current.get("Running"):
            self.container_ip = await self._container_ip(client)

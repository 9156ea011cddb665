"""The Kubernetes engine: one kernel in one pod, reached on its pod IP or a port-forward.

A start (:meth:`PodEngine.start_kernel`) creates the pod (built by :mod:`.manifests`),
then the Secret holding the connection file, owned by the pod so the cluster deletes it
with the pod; an init container copies the file into a memory volume the kernel may
rewrite. The start records each resource the moment it exists (so a failed start can be
undone), follows the pod on the namespace's reflector (:mod:`.watch`) until the kernel
container runs, logs the pod's events as progress, and fails at once, in the cluster's
own words (with the container's log tail), on image-pull errors, an unschedulable pod, a
crash or a 403. With ``wait_for_port`` it then waits until the kernel's shell port
answers (:func:`~provisioners.connection.readiness.wait_until_listening`).

Inside the cluster the client connects to the pod IP, through local listeners that
follow the kernel to its next pod on a restart (:class:`~..connection.relay.KernelRelay`);
outside it, through the API server's port-forward websocket (:mod:`.portforward`).
:mod:`.sweep` removes what dead servers left and lists our pods. Every hook that talks
to the API runs on the engine loop (:mod:`.loop`).

With ``persist_kernels`` the pod and Secret carry the persist label and the adoption
grace, and the pod no ownerReference to the server pod (it outlives it). A stopping server
detaches the kernel (:meth:`PodEngine.detach_kernel`: a detached mark as owner record,
local listeners closed, pod untouched); the next one finds it
(:meth:`PodEngine.adoptable_kernels`, the connection file read back from the Secret) and
takes it over in :meth:`PodEngine.load_kernel_state`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

from ..connection.files import PORT_NAMES, connection_file_content
from ..connection.ports import LOCAL_HOST, PortSource, zmq_listens
from ..connection.readiness import wait_until_listening
from ..connection.relay import KernelRelay
from ..exceptions import EngineUnavailableError, KernelStartError, ProvisionerError
from ..executor import EngineExecutor
from ..lifecycle.engine import Engine
from ..lifecycle.failed_start import exited_while_starting
from ..lifecycle.leftovers import RemovalPending
from ..lifecycle.owner import ServerPod, detached_mark, detached_since
from ..parameters import decode_launch_env, encode_launch_env
from ..secrets import kube_secret_ref
from ..usernames import (
    UsernameError,
    check_username,
    expand_env,
    expand_username,
    uses_username,
)
from . import manifests as m
from .client import (
    Conflict,
    Forbidden,
    KubeApiError,
    KubeClient,
    NotFound,
    Unauthorized,
    acquire_client,
    release_client,
    resource_path,
)
from .loop import KUBERNETES_EXECUTOR, EngineLoop, on_engine_loop
from .portforward import PortForwarder, pod_exec
from .sweep import list_kernel_pods, owner_status, sweep_once, sweep_orphans
from .watch import (
    HeldPorts,
    PodReflector,
    StartProblem,
    describe_progress,
    kernel_exit_code,
    kernel_running,
    pod_events,
    start_problem,
)

if TYPE_CHECKING:
    from .provisioner import KubernetesClusterProvisioner

R = TypeVar("R")

#: Pod events worth a progress line while the pod starts.
_PROGRESS_REASONS = frozenset({"Scheduled", "Pulling", "Pulled", "Created", "Started"})
MERGE_PATCH = "application/merge-patch+json"
#: Seconds between two probes of the shell port (and checks of the pod) while it boots.
_PROBE_INTERVAL = 0.05
#: Longest wait for each patch of a detach: a server's stop must end inside its grace.
_DETACH_PATCH_TIMEOUT = 2.0


class PodEngine(Engine):
    """One kernel in its own pod of a Kubernetes namespace."""

    target: ClassVar[str] = "kubernetes"
    executor: ClassVar[EngineExecutor] = KUBERNETES_EXECUTOR
    settings: KubernetesClusterProvisioner

    def __init__(self, settings: KubernetesClusterProvisioner, kernel_id: str) -> None:
        super().__init__(settings, kernel_id)
        self._client: KubeClient | None = None
        self._reflector: PodReflector | None = None
        self._forwarder: PortForwarder | None = None
        self._relay: KernelRelay | None = None
        self._loop: EngineLoop | None = None
        self._mode = ""
        #: The namespace of a reattached kernel's pod ('' : the settings' one).
        self._namespace = ""
        self.pod_name = ""
        self.pod_uid = ""
        self.pod_ip = ""
        self.secret_name = ""
        #: perf_counter() stamps of the last start: 'start', 'created', 'running', 'listening'.
        self.timings: dict[str, float] = {}
        #: Detached (:meth:`detach_kernel`): the pod runs on for another server; nothing of
        #: this engine touches it any more (a removal only lets go of what is local).
        self._detached = False

    @property
    def namespace(self) -> str:
        """The namespace of this kernel's pod: a reattached kernel's, else the settings'
        with ``{username}`` expanded for the kernel's user. Raises :class:`UsernameError`
        when it uses ``{username}`` and there is no user (see :meth:`_per_user_namespace`)."""
        if self._namespace:
            return self._namespace
        try:
            return m.user_namespace(self.settings.namespace, self.settings.username)
        except ValueError as exc:
            if isinstance(exc, UsernameError):
                raise
            raise self.settings.config_error("namespace", str(exc)) from exc

    def _per_user_namespace(self) -> bool:
        """True when the namespace depends on a user this engine does not have (a template
        engine asked to list, sweep or adopt): there is no one namespace to look in."""
        return (
            not self._namespace
            and not self.settings.username
            and uses_username(self.settings.namespace)
        )

    @property
    def client(self) -> KubeClient | None:
        """The shared API client this engine holds (None while it holds none)."""
        return self._client

    @property
    def connection_mode(self) -> str:
        """'pod-ip' or 'port-forward' once resolved ('' before the first attach)."""
        return self._mode

    # ------------------------------------------------------------------ engine loop

    async def _on_engine(self, coro: Coroutine[Any, Any, R]) -> R:
        """Await ``coro`` on the engine loop, held from this engine's first call until it
        no longer holds an API client (a full stop or a failed attach)."""
        if self._loop is None:
            self._loop = EngineLoop.hold(self)
        loop = self._loop
        try:
            return await loop.run(coro)
        finally:
            if self._client is None and self._loop is loop:
                self._loop = None
                loop.release(self)

    # ------------------------------------------------------------------ API session

    async def _attach(self, mode: str = "") -> None:
        """Hold the shared client and the namespace's reflector; resolve the connection mode.

        Raises :class:`EngineUnavailableError` when the API cannot be reached,
        :class:`KernelStartError` when it refuses to list the namespace's pods, and
        :class:`UsernameError` (before anything is held) for a namespace of no user.
        """
        s = self.settings
        namespace = self.namespace
        if self._client is None:
            self._client = await acquire_client(self, s.kubeconfig, s.context)
            self._client.timeout = s.api_timeout
        try:
            reflector = self._client.reflectors.get(namespace)
            if reflector is None:
                reflector = PodReflector(self._client, namespace)
                self._client.reflectors[namespace] = reflector
            if not reflector.loaded:  # another engine may have started it: wait for its list
                await reflector.start(timeout=s.api_timeout)
        except KubeApiError as exc:
            await self._detach()
            if exc.unreachable:
                msg = f"Kubernetes API unreachable: {exc}"
                raise EngineUnavailableError(msg, target=self.target) from exc
            msg = f"cannot watch pods in namespace {self.namespace!r}: {exc}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self._reflector = reflector
        self._mode = mode or self._resolve_mode()

    def _resolve_mode(self) -> str:
        if self.settings.connection_mode != "auto":
            return self.settings.connection_mode
        assert self._client is not None
        return "pod-ip" if self._client.in_cluster else "port-forward"

    async def _detach(self) -> None:
        client, self._client, self._reflector = self._client, None, None
        if client is not None:
            await release_client(self, client)

    async def _resolve_secret_refs(self) -> None:
        """Read the Secrets that 'secret:NAME/KEY' settings reference, in our namespace.

        Raises the settings' config error naming the key when one cannot be read."""
        assert self._client is not None
        s = self.settings
        for key in s.secret_settings:
            ref = kube_secret_ref(getattr(s, key))
            if ref is None:
                continue
            name, item = ref
            try:
                secret = await self._client.request(
                    "GET", resource_path("secrets", self.namespace, name)
                )
                data = (secret.get("data") or {})[item]
            except (KubeApiError, KeyError) as exc:
                problem = f"cannot read key {item!r} of Secret {self.namespace}/{name}: {exc}"
                raise s.config_error(key, problem) from exc
            s.resolved_secrets[key] = base64.b64decode(data).decode()

    async def _sweep_once(self) -> None:
        assert self._client is not None
        s = self.settings
        key = (s.kubeconfig, s.context, self.namespace)
        await sweep_once(
            key, self._client, self.namespace, self.log, s.server_pod, s.adoption_grace
        )

    # ------------------------------------------------------------------ hooks: engine

    @on_engine_loop
    async def check_engine(self) -> None:
        """Attach to the API and read referenced Secrets; raises as :meth:`_attach` does,
        or the config error of a Secret reference (the client is then let go)."""
        await self._attach()
        try:
            await self._resolve_secret_refs()
        except BaseException:
            await self._detach()  # no start follows: let go of the client (and the loop)
            raise
        if self.settings.sweep_on_start:
            await self._sweep_once()

    async def start_given_up(self) -> None:
        """A first start ended before its pod was created: let go of the client that
        :meth:`check_engine` took (and of the engine loop). Never raises."""
        first_start = not self.pod_name and self._forwarder is None and self._relay is None
        if self._client is not None and first_start:
            with contextlib.suppress(Exception):
                await self._on_engine(self._detach())

    @on_engine_loop
    async def sweep_orphans(self) -> list[str]:
        """Delete our pods and Secrets in the namespace whose server pod or process is gone;
        persisted kernels are marked detached instead, and removed once their adoption
        grace is over (see :func:`.sweep.sweep_orphans`). Nothing where the namespace is
        per user and this engine has no user."""
        if self._per_user_namespace():
            return []
        await self._attach()
        try:
            assert self._client is not None
            s = self.settings
            removed = await sweep_orphans(
                self._client, self.namespace, self.log, s.server_pod, s.adoption_grace
            )
        finally:
            await self._detach()
        return [f"{self.namespace}/{name}" for name in removed]

    async def preflight(self) -> list[str]:
        s = self.settings
        if self._per_user_namespace():
            return [f"namespace {s.namespace!r} is per user: each must exist (not checked here)"]
        where = f"namespace {self.namespace!r}"
        try:
            client = await KubeClient.connect(s.kubeconfig, s.context)
        except Exception as exc:  # a missing or broken kubeconfig: only a warning here
            return [f"the Kubernetes API cannot be reached ({exc}); check kubeconfig/context"]
        try:
            await client.request(
                "GET", resource_path("pods", self.namespace), query=[("limit", "1")]
            )
        except Forbidden:
            return [
                f"pods in {where} cannot be listed (Forbidden): grant this server's "
                "account the Role of the chart (pods, pods/exec, secrets) there, or "
                "choose another namespace"
            ]
        except NotFound:
            return [f"{where} does not exist: create it ('kubectl create namespace')"]
        except KubeApiError as exc:
            return [f"cannot list pods in {where}: {exc}"]
        finally:
            await client.close()
        return []

    @on_engine_loop
    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernel pods in the namespace (none where it is per user and this engine has
        no user: there is no one namespace to list)."""
        if self._per_user_namespace():
            return []
        await self._attach()
        try:
            assert self._client is not None
            return await list_kernel_pods(self._client, self.namespace)
        finally:
            await self._detach()

    # ------------------------------------------------------------------ hooks: ports

    def allocation_host(self) -> str:
        if self.settings.host_network:
            return f"kubernetes-node:{self.settings.node_name or '*'}"
        if self._mode == "port-forward":
            return LOCAL_HOST  # the pod ports double as the local listener ports
        return "kubernetes-pod"

    def port_sources(self) -> list[PortSource]:
        if not self.settings.host_network or self._reflector is None or self._loop is None:
            return []
        return [HeldPorts(self._loop, self._reflector, self.settings.node_name or None)]

    def kernel_bind_ip(self) -> str:
        return "0.0.0.0"

    def kernel_connection_file(self) -> str:
        return m.CONNECTION_FILE

    # ------------------------------------------------------------------ manifests

    def user_volume(self, username: str) -> m.UserVolume | None:
        """The user's own claim (``user_volume_*``), or None without one. Raises
        :class:`UsernameError` (or the settings' config error) naming the setting."""
        s = self.settings
        try:
            return m.user_volume(
                s.user_volume_claim,
                s.user_volume_mount_path,
                s.user_volume_size,
                s.user_volume_storage_class,
                username,
            )
        except ValueError as exc:
            if isinstance(exc, UsernameError):
                raise
            raise s.config_error("user_volume_claim", str(exc)) from exc

    def pod_annotations(self) -> dict[str, str]:
        """The settings' annotations, and this kernel's launch values other than the
        defaults (read back by :meth:`adoptable_kernels`). Pure."""
        found = dict(self.settings.annotations)
        if launch_env := encode_launch_env(self.settings.launch_parameters):
            found[m.ANNOTATION_LAUNCH_ENV] = launch_env
        return found

    def pod_spec(self, cmd: list[str], env: dict[str, str]) -> m.KernelPod:
        """What the kernel's pod is built from: the settings and this kernel's record, with
        ``{username}`` expanded for the kernel's user. Raises :class:`UsernameError`
        naming the setting that uses it when there is no user."""
        s = self.settings
        ports = tuple(int(self.kernel_info[n]) for n in PORT_NAMES)
        username = check_username(s.username or env.get("KERNEL_USERNAME", ""))
        volumes, volume_mounts = m.with_user_volume(
            *m.user_volumes(s.volumes, s.volume_mounts, username), self.user_volume(username)
        )
        working_dir = expand_username(s.working_dir, username, "path", setting="working_dir")
        env = expand_env(env, s.env, username)
        return m.KernelPod(
            name=self.pod_name,
            namespace=self.namespace,
            image=s.image,
            command=tuple(cmd),
            ports=ports,  # type: ignore[arg-type]
            kernel_id=self.kernel_id,
            secret_name=self.secret_name,
            owner=str(s.owner),
            username=username,
            kernelspec=s.spec_name,
            owner_pod=s.server_pod,
            owner_reference=s.owner_references,
            release=s.release,
            pool=self.pool_id,
            persist=s.persist_kernels,
            adoption_grace=s.adoption_grace,
            env=dict(env),
            image_pull_policy=s.image_pull_policy,
            image_pull_secrets=tuple(s.image_pull_secrets),
            resources=m.Resources(
                s.cpu_request,
                s.cpu_limit,
                s.memory_request,
                s.memory_limit,
                s.gpus,
                s.gpu_resource,
            ),
            security=m.Security(s.run_as_user, s.run_as_group, s.fs_group, s.run_as_non_root),
            scheduling=m.Scheduling(
                dict(s.node_selector),
                dict(s.affinity),
                tuple(s.tolerations),
                s.priority_class_name,
                s.host_network,
                s.node_name,
            ),
            volumes=volumes,
            volume_mounts=volume_mounts,
            service_account_name=s.service_account_name,
            automount_service_account_token=s.automount_service_account_token,
            labels=dict(s.labels),
            annotations=self.pod_annotations(),
            working_dir=working_dir,
            grace_period=s.termination_grace_period,
            template=m.parse_pod_template(s.pod_template),
        )

    def build_manifests(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The pod and (unowned) Secret this engine would create; for inspection."""
        pod = m.pod_manifest(self.pod_spec(cmd, env))
        return pod, self.secret_manifest(kernel_info, None)

    def secret_manifest(
        self, kernel_info: dict[str, Any], owner: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The Secret holding the connection file, owned by pod ``owner`` when given."""
        s = self.settings
        labels = m.kernel_labels(self.kernel_id, str(s.owner), pool=self.pool_id)
        if s.release:
            labels[m.LABEL_RELEASE] = m.sanitize_label_value(s.release)
        persist_labels, persist_annotations = m.persist_metadata(
            s.persist_kernels, s.adoption_grace
        )
        labels.update(persist_labels)
        content = connection_file_content(kernel_info, ip="0.0.0.0")
        secret = m.secret_manifest(self.secret_name, self.namespace, content, labels, owner)
        secret["metadata"]["annotations"] = {
            **m.kernel_annotations(self.kernel_id, str(s.owner), owner_pod=s.server_pod),
            **persist_annotations,
        }
        return secret

    # ------------------------------------------------------------------ hooks: start

    @on_engine_loop
    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        """Create the pod and its Secret, then wait until the kernel runs (and, with
        ``wait_for_port``, until its shell port answers); each resource is recorded on
        ``self`` as soon as it exists. Raises :class:`KernelStartError` naming the cause
        (in the cluster's words, with the log tail), :class:`EngineUnavailableError`
        when the API cannot be reached."""
        s = self.settings
        if self._client is None or self._reflector is None:
            await self._attach(self._mode)
        self.timings = {"start": time.perf_counter()}
        # a warm kernel's pod is named after its pool id for good: a claim cannot rename it
        self.pod_name = m.pod_name(s.pod_name_prefix, self.pool_id or uuid.uuid4().hex)
        self.secret_name = m.secret_name_for(self.pod_name)
        self.pod_uid = self.pod_ip = ""
        pod = m.pod_manifest(self.pod_spec(cmd, env))
        volume = self.user_volume(s.username or env.get("KERNEL_USERNAME", ""))
        if volume is not None:
            await self._ensure_claim(volume)
        created = await self._create("pods", pod)
        self.progress(
            "pod created", f"{self.namespace}/{self.pod_name} (image {s.image}, {self._mode})"
        )
        self.timings["created"] = time.perf_counter()
        self.pod_uid = created["metadata"]["uid"]
        self.started = True
        await self._create("secrets", self.secret_manifest(kernel_info, created))
        events = asyncio.create_task(self._follow_events(self.pod_name))
        try:
            running = await self._wait_running()
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
        self.timings["running"] = time.perf_counter()
        node = running.get("spec", {}).get("nodeName") or "?"
        self.progress("pod running", f"{self.namespace}/{self.pod_name} on {node}")
        self.pod_ip = (running.get("status") or {}).get("podIP", "")
        if self._mode == "port-forward":
            await self._open_forwarder()
        if s.wait_for_port:
            await self._wait_for_shell()
            self.timings["listening"] = time.perf_counter()
            if self._forwarder is not None:
                self._forwarder.prime()

    async def _create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``; retried on transient errors (409 on a retry means it was created).

        Raises :class:`KernelStartError` naming the object and the API's answer."""
        assert self._client is not None
        path = resource_path(kind, self.namespace)
        name = body["metadata"]["name"]
        delay = 0.2
        for attempt in range(3):
            try:
                return await self._client.request("POST", path, body=body)
            except KubeApiError as exc:
                if isinstance(exc, Conflict) and attempt:  # a list: the Role grants no get
                    query = [("fieldSelector", f"metadata.name={name}")]
                    found = await self._client.request("GET", path, query=query)
                    if found.get("items"):
                        return dict(found["items"][0])
                if exc.transient and attempt < 2:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                what = (
                    "Forbidden (check the RBAC rules)" if isinstance(exc, Forbidden) else exc.reason
                )
                msg = f"cannot create {kind[:-1]} {self.namespace}/{name}: {what}: {exc}"
                raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure_claim(self, volume: m.UserVolume) -> None:
        """Create the user's claim unless it exists (409: created before, by this or another
        kernel of the user); never deleted with the kernel. Raises :class:`KernelStartError`
        naming the claim and the API's answer (a 403: the Role lacks 'create' on
        persistentvolumeclaims; see the chart's kernels.userVolume)."""
        assert self._client is not None
        path = resource_path("persistentvolumeclaims", self.namespace)
        body = m.claim_manifest(volume, self.namespace, self.settings.release)
        try:
            await self._client.request("POST", path, body=body)
        except Conflict:
            self.progress("user volume", f"claim {self.namespace}/{volume.claim} exists")
            return
        except KubeApiError as exc:
            what = (
                "Forbidden (grant 'create' on persistentvolumeclaims)"
                if isinstance(exc, Forbidden)
                else exc
            )
            msg = f"cannot create the user's claim {self.namespace}/{volume.claim}: {what}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self.progress("user volume", f"claim {self.namespace}/{volume.claim} created")

    async def _wait_running(self) -> dict[str, Any]:
        """Wait on the reflector until the kernel container runs; fail fast on a lost cause."""
        reflector = self._reflector
        assert reflector is not None
        name, last = self.pod_name, ""
        seen = False
        try:
            while True:
                pod = reflector.get(name)
                if pod is not None and pod["metadata"].get("uid") == self.pod_uid:
                    seen = True
                    unschedulable_fails = self.settings.fail_on_unschedulable
                    problem = start_problem(pod, unschedulable_fails=unschedulable_fails)
                    if problem is not None:
                        await self._fail(problem)
                    if kernel_running(pod):
                        return pod
                    progress = describe_progress(pod)
                    if progress != last:
                        self.progress("pod status", progress)
                        last = progress
                elif pod is None and seen:
                    msg = f"kernel pod {self.namespace}/{name} was deleted while starting"
                    raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
                before = pod

                def changed(before: dict[str, Any] | None = before) -> bool:
                    return reflector.get(name) is not before

                await reflector.wait_for(changed, timeout=2.0)
        except asyncio.CancelledError:
            self.log.warning(
                "Kernel %s: pod %s not running in time (%s)", self.kernel_id, name, last or "?"
            )
            raise

    async def _fail(self, problem: StartProblem) -> NoReturn:
        """Raise the start failure for ``problem``, with the container's log tail."""
        pod = f"pod {self.namespace}/{self.pod_name}"
        if problem.exit_code is not None and problem.container:  # the kernel exited
            tail = await self._log_tail(problem.container)
            where = f"{pod}, container {problem.container!r} ({problem.reason})"
            msg = exited_while_starting(problem.exit_code, where, tail)
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
        msg = f"kernel {pod} failed to start: {problem}"
        if problem.wants_logs and problem.container:
            tail = await self._log_tail(problem.container)
            if tail:
                msg += f"\n--- last lines of its log ---\n{tail}"
        raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)

    async def _follow_events(self, name: str) -> None:
        """Log the pod's events (scheduled, pulling, started, warnings) while it starts."""
        assert self._client is not None
        try:
            async for event in pod_events(self._client, self.namespace, name):
                reason, text = event.get("reason", ""), event.get("message", "")
                if event.get("type") == "Warning":
                    # the kubelet may try the Secret volume before we created the Secret
                    if reason == "FailedMount" and self.secret_name in text:
                        self.log.debug(
                            "Kernel %s: pod %s: %s: %s", self.kernel_id, name, reason, text
                        )
                    else:
                        self.progress(f"warning {reason}", text)
                elif reason in _PROGRESS_REASONS:
                    self.progress(reason, text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # progress logs never fail a start
            self.log.debug("Kernel %s: events of pod %s: %r", self.kernel_id, name, exc)

    async def _log_tail(self, container: str, lines: int = 20) -> str:
        """The last lines of ``container``'s log ('' when it cannot be read)."""
        assert self._client is not None
        path = resource_path("pods", self.namespace, self.pod_name, "log")
        query = [("container", container), ("tailLines", str(lines))]
        try:
            return (await self._client.request_text(path, query)).strip()
        except KubeApiError as exc:
            self.log.debug("Kernel %s: no log of %s: %s", self.kernel_id, container, exc)
            return ""

    async def _open_forwarder(self) -> None:
        """Open (or retarget to the current pod) the port-forward's local listeners."""
        assert self._client is not None
        remote = [int(self.kernel_info[n]) for n in PORT_NAMES]
        if self._forwarder is not None:
            self._forwarder.retarget(self.pod_name)
            if self._forwarder.remote_ports == remote and self._forwarder.local_ports:
                return
            await self._forwarder.stop()
        local = remote if self.port_host == LOCAL_HOST else [0] * len(remote)
        self._forwarder = PortForwarder(
            self._client,
            self.namespace,
            self.pod_name,
            remote,
            local,
            connect_timeout=self.settings.api_timeout,
            protocol=self.settings.port_forward_protocol,
            logger=self.log,
        )
        await self._forwarder.start()

    async def _wait_for_shell(self) -> None:
        """Wait until the shell port answers; fail (with the log) if the kernel ends first."""
        port = int(self.kernel_info["shell_port"])
        try:
            # the pod check is a read of the reflector's cache: before every probe
            await wait_until_listening(
                self._shell_listening,
                self._check_booting,
                interval=_PROBE_INTERVAL,
                check_every=0.0,
                first_check=0.0,
            )
        except asyncio.CancelledError:
            forwarded = self._forwarder is not None
            self.log.warning(
                "Kernel %s: pod %s runs but its shell port never answered %s%s",
                self.kernel_id,
                self.pod_name,
                "through the port-forward" if forwarded else f"on {self.pod_ip}:{port}",
                "" if forwarded else " (is the pod network reachable from this server?)",
            )
            raise

    async def _shell_listening(self) -> bool:
        """Whether the kernel's shell port speaks ZMTP, reached as clients reach it.

        A refused port-forward (401/403) fails the start."""
        if self._forwarder is None:
            port = int(self.kernel_info["shell_port"])
            return await zmq_listens(self.pod_ip, port, timeout=1.0)
        try:
            return await self._forwarder.probe(0)
        except (Unauthorized, Forbidden) as exc:
            msg = (
                f"port-forward to kernel pod {self.namespace}/{self.pod_name} refused "
                f"(grant pods/portforward, or use connection_mode='pod-ip'): {exc}"
            )
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        except KubeApiError:
            return False

    async def _check_booting(self) -> None:
        """Raise :class:`KernelStartError` when the booting kernel's pod is gone or failed."""
        assert self._reflector is not None
        pod = self._reflector.get(self.pod_name)
        if pod is None:
            msg = f"kernel pod {self.namespace}/{self.pod_name} was deleted while starting"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id)
        problem = start_problem(pod)
        if problem is not None:
            await self._fail(problem)

    @on_engine_loop
    async def claim_kernel(self, pool_id: str, username: str = "") -> None:
        """Relabel warm kernel ``pool_id``'s pod and Secret with :attr:`kernel_id` (already
        the real id). A pod's name cannot change, so the claimed kernel keeps its pod
        ``<prefix>-pool-<hex>`` and the Secret named after it; what ``list``, ``cleanup``
        and the orphan sweep read the kernel id from changes (the kernel-id label and
        annotation), and the pool label, which marks an unclaimed warm kernel, goes; the
        user's label and annotation come with ``username``. Raises
        :class:`ProvisionerError` naming the pod when the API refuses."""
        if not self.pod_name:
            return
        if self._client is None or self._reflector is None:
            await self._attach(self._mode)
        body = m.claim_patch(self.kernel_id, username)

        async def relabel(kind: str, name: str) -> None:
            try:
                await self._patch(resource_path(kind, self.namespace, name), body)
            except KubeApiError as exc:
                forbidden = isinstance(exc, Forbidden)
                what = "Forbidden (grant 'patch' on pods and secrets)" if forbidden else exc
                where = "" if kind == "pods" else f" (its Secret {name})"
                msg = (
                    f"cannot claim warm kernel pod {self.namespace}/{self.pod_name}{where} "
                    f"as kernel {self.kernel_id} (was {pool_id}): {what}"
                )
                raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc

        # the pod and its Secret at once: a claim waits for one round trip, not two
        outcomes = await asyncio.gather(
            relabel("pods", self.pod_name),
            relabel("secrets", self.secret_name),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self.log.debug(
            "Kernel %s: warm pod %s/%s relabelled (was %s)",
            self.kernel_id,
            self.namespace,
            self.pod_name,
            pool_id,
        )

    async def _patch(self, path: str, body: dict[str, object]) -> None:
        """A JSON merge patch (idempotent), tried once more on a transient answer."""
        assert self._client is not None
        try:
            await self._client.request("PATCH", path, body=body, content_type=MERGE_PATCH)
        except KubeApiError as exc:
            if not exc.transient:
                raise
            await asyncio.sleep(0.1)
            await self._client.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    @on_engine_loop
    async def kernel_address(self) -> tuple[str, dict[str, int]]:
        """The forwarder's local ports, or the pod IP (through the relay by default).

        Raises :class:`~provisioners.exceptions.TunnelError` when listeners cannot open."""
        if self._mode == "port-forward":
            if self._forwarder is None or not self._forwarder.local_ports:
                await self._open_forwarder()
            assert self._forwarder is not None
            return "127.0.0.1", dict(zip(PORT_NAMES, self._forwarder.local_ports, strict=True))
        ports = {n: int(self.kernel_info[n]) for n in PORT_NAMES}
        if not self.settings.pod_ip_relay:
            return self.pod_ip, ports
        if self._relay is None:  # on the engine loop, which runs between callers' calls
            self._relay = self.settings.kernel_relay(KUBERNETES_EXECUTOR, self.settings.api_timeout)
        return await self._relay.follow(self.pod_ip, ports, f"pod {self.pod_name}")

    # ------------------------------------------------------------------ hooks: running

    async def poll_kernel(self) -> int | None:
        """The kernel container's exit code from the reflector's cache (never raises)."""
        # a read of the reflector's cache (replaced, never changed in place, by the loop)
        if self._reflector is None or not self.pod_name:
            return 0
        return kernel_exit_code(self._reflector.get(self.pod_name))

    @on_engine_loop
    async def signal_kernel(self, signum: int) -> None:
        """Send ``signum`` to the kernel (pid 1) by an exec in its container; raises
        :class:`ProvisionerError` when neither ``kill`` nor python3 could deliver it."""
        if not self.pod_name or await self.poll_kernel() is not None:
            return
        assert self._client is not None
        name = signal.Signals(signum).name.removeprefix("SIG")
        commands = (
            ["sh", "-c", f"kill -s {name} 1"],
            ["python3", "-c", f"import os; os.kill(1, {int(signum)})"],
        )
        error: Exception | None = None
        for command in commands:
            try:
                result = await pod_exec(
                    self._client,
                    self.namespace,
                    self.pod_name,
                    command,
                    container=m.KERNEL_CONTAINER,
                    timeout=self.settings.api_timeout,
                )
            except KubeApiError as exc:
                error = exc
                continue
            if result.exit_code == 0:
                self.log.debug(
                    "Kernel %s: sent SIG%s in pod %s", self.kernel_id, name, self.pod_name
                )
                return
            error = ProvisionerError(
                f"exit code {result.exit_code}: {result.stderr.strip()[:200]}", target=self.target
            )
        msg = f"cannot send SIG{name} to kernel pod {self.pod_name}: {error}"
        raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from error

    @on_engine_loop
    async def stop_kernel(self, force: bool) -> None:
        """Delete the pod (grace 1 s when forced); raises :class:`ProvisionerError` when
        the API refuses."""
        await self._delete_pod(1 if force else self.settings.termination_grace_period)

    async def _delete_pod(self, grace: int) -> None:
        """Delete the pod with ``grace`` seconds, at least 1 (as kubectl does): a forced
        delete (0) drops the object while the kubelet may still run the kernel."""
        if not self.pod_name or self._client is None:
            return
        path = resource_path("pods", self.namespace, self.pod_name)
        grace = max(1, int(grace))
        query = [("gracePeriodSeconds", str(grace)), ("propagationPolicy", "Background")]
        try:
            await self._client.request("DELETE", path, query=query)
        except NotFound:
            pass
        except KubeApiError as exc:
            raise ProvisionerError(
                f"cannot delete pod {self.pod_name}: {exc}",
                target=self.target,
                kernel_id=self.kernel_id,
            ) from exc

    @on_engine_loop
    async def remove_kernel(self, restart: bool) -> None:
        """Delete the pod and its Secret; on a full stop confirm the pod is gone (else
        :class:`RemovalPending`) and let go of forwarder, relay and client. Raises
        :class:`ProvisionerError` (keeping the pod's name) when the API refuses."""
        name = self.pod_name
        failed, self.start_failed = self.start_failed, False
        if self._detached:  # the pod is another server's now: only let go of ours
            self.pod_name = self.pod_uid = self.pod_ip = self.secret_name = ""
            self.started = False
            await self._let_go()
            return
        if self._relay is not None:
            await self._relay.pause()  # clients reconnect, and wait, until the next pod runs
        try:
            if name:  # raises, keeping the pod's name, when the API refuses the delete
                if self._client is None or self._reflector is None:
                    await self._attach(self._mode)
                await self._delete_pod(1)
                assert self._client is not None
                secret = resource_path("secrets", self.namespace, self.secret_name)
                try:
                    await self._client.request("DELETE", secret)
                except NotFound:
                    pass  # owned by the pod: the cluster deletes it too
                except KubeApiError as exc:
                    self.log.warning("Kernel %s: secret not deleted: %s", self.kernel_id, exc)
                keep_waiting = not restart or self.settings.host_network
                if keep_waiting and self._reflector is not None:
                    await self._confirm_removed(name, restart, failed)
            self.pod_name = self.pod_uid = self.pod_ip = self.secret_name = ""
            self.started = False
        finally:
            if not restart:
                await self._let_go()

    async def _let_go(self) -> None:
        """Close the port-forward's listeners and the relay, and let go of the API client
        (and the engine loop); the pod is not touched."""
        try:
            if self._forwarder is not None:
                forwarder, self._forwarder = self._forwarder, None
                await forwarder.stop()
            if self._relay is not None:
                relay, self._relay = self._relay, None
                await relay.close()
        finally:
            await self._detach()

    async def _confirm_removed(self, name: str, restart: bool, failed: bool) -> None:
        """Wait until the deleted pod ``name`` is gone; after a ``failed`` start, do not
        wait: the start's error is reported at once (a real kubelet takes up to a minute
        to remove a pod stuck in an image pull). A full stop whose pod is still there
        raises :class:`RemovalPending`: the base keeps the kernel and its ports recorded
        and confirms the removal in the background."""
        reflector = self._reflector
        assert reflector is not None
        if reflector.get(name) is None:
            return
        if not failed and await reflector.wait_for(
            lambda: reflector.get(name) is None, timeout=self.settings.api_timeout + 5
        ):
            return
        pod = reflector.get(name)
        if pod is None:
            return
        deleted = pod["metadata"].get("deletionTimestamp") or "not yet"
        state = f"{describe_progress(pod)}; deletionTimestamp {deleted}"
        if restart:
            self.log.warning(
                "Kernel %s: pod %s still terminating (%s)", self.kernel_id, name, state
            )
            return
        msg = f"kernel pod {self.namespace}/{name} is still being removed ({state})"
        raise RemovalPending(msg, target=self.target, kernel_id=self.kernel_id)

    # ------------------------------------------------------------------ hooks: state

    def kernel_state(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "pod": self.pod_name,
            "uid": self.pod_uid,
            "secret": self.secret_name,
            "pod_ip": self.pod_ip,
            "mode": self._mode,
        }

    @on_engine_loop
    async def load_kernel_state(self, state: dict[str, Any]) -> None:
        """Reattach to the saved pod and take it over (this server becomes its owner,
        overwriting a detached mark: :meth:`_take_ownership`); the port-forward or relay
        reopens when the lifecycle asks for the kernel's address. Raises as
        :meth:`check_engine` does, or :class:`ProvisionerError` when the take-over is
        refused (the client is then let go). A pod gone (or replaced) leaves the engine
        without a kernel."""
        if not state.get("pod"):
            return
        self._detached = False
        self._namespace = state.get("namespace") or ""
        await self._attach(state.get("mode", ""))
        try:
            await self._resolve_secret_refs()  # the tunnels may need a password from a Secret
        except BaseException:
            await self._detach()  # not reattached: let go of the client (and the loop)
            raise
        assert self._client is not None and self._reflector is not None
        self.pod_name, self.pod_uid = state["pod"], state.get("uid", "")
        self.secret_name = state.get("secret") or m.secret_name_for(self.pod_name)
        pod = self._reflector.get(self.pod_name)
        if pod is None or (self.pod_uid and pod["metadata"].get("uid") != self.pod_uid):
            self.log.warning("Kernel %s: pod %s is gone", self.kernel_id, self.pod_name)
            self.started = False
            return
        try:
            await self._take_ownership(pod, state.get("adopt_from"))
        except BaseException:
            self.pod_name = self.pod_uid = self.secret_name = ""
            await self._detach()  # not reattached: let go of the client (and the loop)
            raise
        self.pod_ip = (pod.get("status") or {}).get("podIP", "") or state.get("pod_ip", "")
        self.started = kernel_exit_code(pod) is None
        self.log.info("Kernel %s: reattached to pod %s", self.kernel_id, self.pod_name)

    async def _take_ownership(self, pod: dict[str, Any], adopt_from: str | None) -> None:
        """Make this server the owner of the reattached pod and its Secret (owner label and
        annotations, overwriting a detached mark), so that sweeps see a live owner.

        An adoption (``adopt_from``: the owner record the pod had when it was found
        adoptable) takes the pod only from that owner or from a detached mark, and only
        from the pod version it read (a patch with its resourceVersion): of two servers
        adopting at once, one wins and the other is refused. Raises
        :class:`ProvisionerError` naming the pod when the API refuses or another server
        has taken it."""
        s = self.settings
        owner, owner_pod = str(s.owner), s.server_pod
        path = resource_path("pods", self.namespace, self.pod_name)
        previous = ""
        for attempt in range(2):
            annotations = pod["metadata"].get("annotations") or {}
            previous = annotations.get(m.ANNOTATION_OWNER, "")
            if previous == owner and annotations.get(m.ANNOTATION_OWNER_POD, "") == owner_pod:
                return  # ours already (a reconnect of this very server)
            taken = adopt_from is not None and previous not in (adopt_from, owner)
            if taken and detached_since(previous) is None:
                msg = (
                    f"kernel pod {self.namespace}/{self.pod_name} was taken over by "
                    f"another server ({previous}) meanwhile"
                )
                raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id)
            body = m.owner_patch(owner, owner_pod)
            body["metadata"]["resourceVersion"] = pod["metadata"].get("resourceVersion")
            try:
                await self._patch(path, body)
                break
            except NotFound:
                return  # gone meanwhile: the reflector says so at the next poll
            except Conflict as exc:  # changed since read (or our cache was behind): read again
                fresh = await self._read_pod()
                if fresh is None:
                    return
                if attempt:
                    self._ownership_refused(exc)
                pod = fresh
            except KubeApiError as exc:
                self._ownership_refused(exc)
        try:
            secret = resource_path("secrets", self.namespace, self.secret_name)
            await self._patch(secret, m.owner_patch(owner, owner_pod))
        except NotFound:
            pass  # the kernel already has its connection file
        except KubeApiError as exc:
            self._ownership_refused(exc, f" (its Secret {self.secret_name})")
        self.log.info(
            "Kernel %s: pod %s/%s taken over (its owner was %s)",
            self.kernel_id,
            self.namespace,
            self.pod_name,
            previous or "?",
        )

    def _ownership_refused(self, exc: KubeApiError, what: str = "") -> NoReturn:
        forbidden = isinstance(exc, Forbidden)
        why = "Forbidden (grant 'patch' on pods and secrets)" if forbidden else exc
        msg = f"cannot take over kernel pod {self.namespace}/{self.pod_name}{what}: {why}"
        raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from exc

    async def _read_pod(self) -> dict[str, Any] | None:
        """The kernel's pod as the API has it now (a list by name: the Role grants no get)."""
        assert self._client is not None
        query = [("fieldSelector", f"metadata.name={self.pod_name}")]
        found = await self._client.request(
            "GET", resource_path("pods", self.namespace), query=query
        )
        items = found.get("items") or []
        return dict(items[0]) if items else None

    # ------------------------------------------------------------------ hooks: persistence

    @on_engine_loop
    async def detach_kernel(self) -> None:
        """Write :func:`detached_mark` as the owner record of the pod and its Secret (owner
        label, owner and owner-pod annotations; the pod also loses its ownerReferences, so
        the server pod's deletion does not collect it), then close this server's
        port-forward listeners and relay for it and let go of the API client, leaving the
        pod and Secret running. Each patch waits at most :data:`_DETACH_PATCH_TIMEOUT`.
        Raises :class:`ProvisionerError` naming the pod when the API refused or did not
        answer (what this server held is let go even then)."""
        if not self.pod_name or self._detached:
            return
        self._detached = True
        error: BaseException | None = None
        try:
            if self._client is None:
                await self._attach(self._mode)
            await asyncio.wait_for(self._mark_detached(), _DETACH_PATCH_TIMEOUT + 0.5)
        except (ProvisionerError, KubeApiError, asyncio.TimeoutError) as exc:
            error = exc
        finally:
            await self._let_go()
        if error is not None:
            why = "no answer in time" if isinstance(error, asyncio.TimeoutError) else error
            msg = f"cannot mark kernel pod {self.namespace}/{self.pod_name} detached: {why}"
            raise ProvisionerError(msg, target=self.target, kernel_id=self.kernel_id) from error
        self.log.info(
            "Kernel %s: pod %s/%s detached", self.kernel_id, self.namespace, self.pod_name
        )

    async def _mark_detached(self) -> None:
        """Patch the detached mark onto the pod and its Secret (a Secret gone is no error)."""
        assert self._client is not None
        client, mark = self._client, detached_mark()

        async def patch(kind: str, name: str, body: dict[str, Any]) -> None:
            path = resource_path(kind, self.namespace, name)
            try:
                await client.request(
                    "PATCH",
                    path,
                    body=body,
                    content_type=MERGE_PATCH,
                    timeout=_DETACH_PATCH_TIMEOUT,
                )
            except NotFound:
                if kind == "pods":
                    raise

        await asyncio.gather(
            patch("pods", self.pod_name, m.owner_patch(mark, mark, drop_owner_references=True)),
            patch("secrets", self.secret_name, m.owner_patch(mark, mark)),
        )

    @on_engine_loop
    async def adoptable_kernels(self) -> list[dict[str, Any]]:
        """Running, persisted, claimed (not warm) kernel pods of this kernelspec in the
        namespace (of the settings' release, or of none when it is unset) whose owner
        record is a detached mark or names a server pod or process that is gone; each
        with its connection file read from its Secret (a pod whose Secret cannot be read
        is logged and left out). Raises :class:`EngineUnavailableError` when the API
        cannot be reached, :class:`ProvisionerError` when it refuses the list. None where
        the namespace is per user ('{username}') and this engine has no user."""
        if self._per_user_namespace():
            return []
        await self._attach()
        try:
            return await self._adoptable()
        except KubeApiError as exc:
            if exc.unreachable:
                msg = f"Kubernetes API unreachable: {exc}"
                raise EngineUnavailableError(msg, target=self.target) from exc
            msg = f"cannot list kernel pods in namespace {self.namespace!r}: {exc}"
            raise ProvisionerError(msg, target=self.target) from exc
        finally:
            await self._detach()

    async def _adoptable(self) -> list[dict[str, Any]]:
        assert self._client is not None
        s = self.settings
        selector = f"{m.KERNEL_SELECTOR},{m.LABEL_PERSIST}=true"
        if s.release:
            selector += f",{m.LABEL_RELEASE}={m.sanitize_label_value(s.release)}"
        query = [("labelSelector", selector)]
        pods = await self._client.request("GET", resource_path("pods", self.namespace), query=query)
        me = ServerPod.parse(s.server_pod)
        checked: dict[str, bool] = {}
        chosen = []
        for pod in pods.get("items") or []:
            meta = pod.get("metadata") or {}
            labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
            if annotations.get(m.ANNOTATION_KERNELSPEC) != s.spec_name:
                continue
            if not m.is_persisted(meta) or (not s.release and m.LABEL_RELEASE in labels):
                continue  # a warm kernel, or an installation's kernel seen from outside it
            if meta.get("deletionTimestamp") or not kernel_running(pod):
                continue
            status, _, _ = await owner_status(self._client, meta, me, checked, self.log)
            if status != "live":
                chosen.append(pod)
        if not chosen:
            return []
        # one list for all their Secrets (the Role grants list, and get only by name)
        path = resource_path("secrets", self.namespace)
        secrets = await self._client.request("GET", path, query=query)
        by_name = {x["metadata"]["name"]: x for x in secrets.get("items") or []}
        found = []
        for pod in chosen:
            record = self._adoption_record(
                pod, by_name.get(m.secret_name_for(pod["metadata"]["name"]))
            )
            if record is not None:
                found.append(record)
        return found

    def _adoption_record(
        self, pod: dict[str, Any], secret: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """The saved state of the kernel in ``pod`` (its connection file from its Secret),
        or None, logged without the file's content, when the Secret cannot be read."""
        meta = pod["metadata"]
        name = meta["name"]
        annotations = meta.get("annotations") or {}
        kernel_id = annotations.get(m.ANNOTATION_KERNEL_ID, "")
        secret_name = m.secret_name_for(name)
        problem = "no such Secret"
        kernel_info: Any = None
        if secret is not None:
            try:
                raw = base64.b64decode((secret.get("data") or {})[m.CONNECTION_KEY])
                kernel_info = json.loads(raw)
                ports = [int(kernel_info[n]) for n in PORT_NAMES]
                problem = ""
            except (LookupError, TypeError, ValueError) as exc:  # never its content
                problem = f"no valid {m.CONNECTION_KEY} ({type(exc).__name__})"
        if problem:
            self.log.warning(
                "Kernel %s: pod %s/%s not adoptable: its Secret %s: %s",
                kernel_id,
                self.namespace,
                name,
                secret_name,
                problem,
            )
            return None
        if not kernel_id or not isinstance(kernel_info, dict):
            return None
        state = {
            "namespace": self.namespace,
            "pod": name,
            "uid": meta.get("uid", ""),
            "secret": secret_name,
            "pod_ip": (pod.get("status") or {}).get("podIP", ""),
            "mode": self._mode,
            # what load_kernel_state takes the pod over from (refused if another took it)
            "adopt_from": annotations.get(m.ANNOTATION_OWNER, ""),
        }
        return {
            "kernel_id": kernel_id,
            "kernel_info": kernel_info,
            "ports": ports,
            "port_host": self.allocation_host(),
            "state": state,
            "username": annotations.get(m.ANNOTATION_USERNAME, ""),
            "launch_env": decode_launch_env(annotations.get(m.ANNOTATION_LAUNCH_ENV)),
        }

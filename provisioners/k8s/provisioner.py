"""The Kubernetes target: one pod per kernel, reached on its pod IP or through a port-forward.

This module holds the settings and the engine hooks. A start creates the pod (built by
:mod:`.manifests`), then the Secret holding the connection file, owned by the pod so the
cluster deletes it with the pod; an init container copies the file into a memory volume
the kernel may rewrite. :mod:`.podstart` creates them and waits on a watch (a reflector
shared per namespace, :mod:`.watch`) until the kernel answers, failing at once, in the
cluster's own words, on image-pull errors, an unschedulable pod, a crash, or a 403.
Inside the cluster the client connects to the pod IP, through local listeners that
follow the kernel to its next pod on a restart (:class:`~..connection.relay.KernelRelay`);
outside it, through the API server's port-forward websocket (:mod:`.portforward`).
:mod:`.sweep` removes what dead servers left and lists our pods; :mod:`.claim` relabels
a claimed warm kernel's pod.
"""

from __future__ import annotations

import base64
import signal
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode, Union, default

from ..connection.files import connection_file_content
from ..connection.ports import LOCAL_HOST, PortSource
from ..connection.relay import KernelRelay
from ..exceptions import EngineUnavailableError, KernelStartError, ProvisionerError
from ..executor import EngineExecutor
from ..lifecycle.engine import PORT_NAMES
from ..lifecycle.leftovers import RemovalPending
from ..lifecycle.owner import ServerPod
from ..secrets import kube_secret_ref
from . import manifests as m
from .claim import claim_pod
from .client import KubeApiError, KubeClient, acquire_client, default_namespace, release_client
from .loop import KUBERNETES_EXECUTOR, EngineLoop, on_engine_loop
from .ownership import PodOwnership
from .podstart import open_forwarder, start_pod
from .portforward import PortForwarder, pod_exec
from .sweep import list_kernel_pods, sweep_once, sweep_orphans
from .watch import HeldPorts, PodReflector, describe_progress, kernel_exit_code

R = TypeVar("R")


class KubernetesClusterProvisioner(PodOwnership):
    """Starts each kernel in its own pod of a Kubernetes namespace."""

    target: ClassVar[str] = "kubernetes"
    kube_secret_refs: ClassVar[bool] = True
    executor: ClassVar[EngineExecutor] = KUBERNETES_EXECUTOR

    image = Unicode("", config=True, help="Kernel image (any image with a stock Jupyter kernel).")
    image_pull_policy = CaselessStrEnum(
        ["Always", "IfNotPresent", "Never"],
        default_value="IfNotPresent",
        config=True,
        help="imagePullPolicy of the kernel's containers.",
    )
    image_pull_secrets = List(
        Unicode(), default_value=[], config=True, help="Names of Secrets used to pull the image."
    )
    namespace = Unicode(
        config=True,
        help="""Namespace of the kernel pods. Default: $CLUSTER_PROVISIONERS_NAMESPACE, else the
        server pod's own namespace when in a cluster, else 'default'.""",
    )
    kubeconfig = Unicode(
        "",
        config=True,
        help="""kubeconfig file to use. Default: $KUBECONFIG, else the service account when the
        server runs in a pod, else ~/.kube/config.""",
    )
    context = Unicode("", config=True, help="kubeconfig context (default: its current one).")
    connection_mode = CaselessStrEnum(
        ["auto", "pod-ip", "port-forward"],
        default_value="auto",
        config=True,
        help="""How this server reaches the kernel: 'pod-ip' connects to the pod's IP (needs the
        cluster network; through local relays, see 'pod_ip_relay'), 'port-forward' goes
        through the API server's port-forward websocket from local listeners on 127.0.0.1;
        'auto' picks pod-ip with in-cluster config, else
        port-forward.""",
    )
    pod_ip_relay = Bool(
        True,
        config=True,
        help="""In 'pod-ip' mode, give clients local listeners (127.0.0.1, one per channel) that
        relay to the pod IP, and point them at the new pod on each restart: a restart makes a
        new pod with a new IP, and a client whose sockets stay open (a websocket that
        JupyterLab or a gateway keeps through a restart) would keep talking to the old one.
        Off: clients get the bare pod IP (reachable from other machines of the cluster
        network, one hop less), and such clients lose the kernel at every restart.""",
    )
    api_timeout = Float(10.0, config=True, help="Seconds each Kubernetes API request may take.")
    cpu_request = Unicode("", config=True, help="CPU request of the kernel, e.g. '500m'.")
    cpu_limit = Unicode("", config=True, help="CPU limit of the kernel, e.g. '2'.")
    memory_request = Unicode("", config=True, help="Memory request of the kernel, e.g. '1Gi'.")
    memory_limit = Unicode("", config=True, help="Memory limit of the kernel, e.g. '4Gi'.")
    gpus = Int(0, config=True, help="GPUs for the kernel (a limit of 'gpu_resource').")
    gpu_resource = Unicode(
        m.GPU_RESOURCE, config=True, help="Extended resource name of GPUs, e.g. 'amd.com/gpu'."
    )
    node_selector = Dict(
        value_trait=Unicode(), default_value={}, config=True, help="nodeSelector of the pod."
    )
    affinity = Dict(default_value={}, config=True, help="affinity of the pod (Kubernetes form).")
    tolerations = List(Dict(), default_value=[], config=True, help="tolerations of the pod.")
    volumes = List(Dict(), default_value=[], config=True, help="Extra volumes of the pod.")
    volume_mounts = List(
        Dict(), default_value=[], config=True, help="Extra volumeMounts of the kernel container."
    )
    service_account_name = Unicode(
        "", config=True, help="serviceAccountName of the pod (default: the namespace's default)."
    )
    automount_service_account_token = Bool(
        False,
        config=True,
        help="Mount the service account's API token into the kernel (off: kernels get no token).",
    )
    run_as_user = Int(
        1000, allow_none=True, config=True, help="runAsUser of the kernel (None: the image's)."
    )
    run_as_group = Int(
        1000, allow_none=True, config=True, help="runAsGroup of the kernel (None: the image's)."
    )
    fs_group = Int(
        1000,
        allow_none=True,
        config=True,
        help="fsGroup of the pod; it lets the kernel's user read the connection Secret.",
    )
    run_as_non_root = Bool(True, config=True, help="Refuse to run the kernel as root.")
    labels = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="Extra pod labels (values are sanitized to the label charset; ours win).",
    )
    annotations = Dict(
        value_trait=Unicode(), default_value={}, config=True, help="Extra pod annotations."
    )
    priority_class_name = Unicode("", config=True, help="priorityClassName of the pod.")
    pod_template = Union(
        [Unicode(), Dict()],
        default_value="",
        config=True,
        help="""A Pod (YAML text or a mapping) merged over the built pod: mappings merge, lists of
        named items (containers, env, volumes) merge by name, other values replace. The
        kernel container is named 'kernel'. Name, namespace, our labels, the connection
        volumes and the kernel's command are kept.""",
    )
    host_network = Bool(
        False,
        config=True,
        help="""Run the kernel in the node's network namespace. Its ports are then allocated per
        node ('node_name' pins the node) or, without 'node_name', kept unique across all our
        hostNetwork pods of the namespace, since the node is only known after scheduling.""",
    )
    node_name = Unicode(
        "", config=True, help="Pin the pod to this node (a kubernetes.io/hostname nodeSelector)."
    )
    pod_name_prefix = Unicode(
        "kernel", config=True, help="Pod names are '<prefix>-<random hex>' (a DNS-1123 label)."
    )
    working_dir = Unicode(
        "", config=True, help="Working directory of the kernel (default: image's)."
    )
    termination_grace_period = Int(
        5, config=True, help="Seconds a terminated kernel pod gets before it is killed."
    )
    fail_on_unschedulable = Bool(
        True,
        config=True,
        help="""Fail the start at once when the scheduler reports the pod Unschedulable; turn off
        with a cluster autoscaler that adds nodes.""",
    )
    wait_for_port = Bool(
        True,
        config=True,
        help="""End the start only once the kernel's shell port answers (its ZMQ greeting), so a
        kernel that dies while booting fails the start with its log; off: once it runs.""",
    )
    sweep_on_start = Bool(
        True,
        config=True,
        help="""Delete pods and Secrets of dead servers of this machine in the namespace, once per
        process, when the first kernel starts there.""",
    )

    @default("namespace")
    def _namespace_default(self) -> str:
        return default_namespace()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: KubeClient | None = None
        self._reflector: PodReflector | None = None
        self._forwarder: PortForwarder | None = None
        self._relay: KernelRelay | None = None
        self._engine: EngineLoop | None = None
        self._mode = ""
        self.pod_name = ""
        self.pod_uid = ""
        self.pod_ip = ""
        self.secret_name = ""
        #: perf_counter() stamps of the last start: 'start', 'created', 'running'.
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ config

    def validate_config(self) -> None:
        super().validate_config()
        if not self.image:
            raise self.config_error("image", "required: the kernel image the pod runs")
        if not m.is_dns_label(self.namespace):
            raise self.config_error("namespace", f"{self.namespace!r} is not a DNS-1123 label")
        if not m.is_dns_label(self.pod_name_prefix) or len(self.pod_name_prefix) > 24:
            raise self.config_error(
                "pod_name_prefix", "use at most 24 lowercase letters, digits and '-'"
            )
        for key in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            value = getattr(self, key)
            if value and not m.is_quantity(value):
                raise self.config_error(key, f"{value!r} is not a quantity (e.g. '500m', '2Gi')")
        if self.gpus < 0:
            raise self.config_error("gpus", "must be >= 0")
        if self.termination_grace_period < 0:
            raise self.config_error("termination_grace_period", "must be >= 0")
        if self.api_timeout <= 0:
            raise self.config_error("api_timeout", "must be > 0")
        if self.server_pod and ServerPod.parse(self.server_pod) is None:
            raise self.config_error("server_pod", "use 'namespace/name/uid'")
        ours = set(m.kernel_labels("x", "x", "x", "x")) | {m.LABEL_RELEASE}
        if ours & set(self.labels):
            raise self.config_error("labels", f"{sorted(ours & set(self.labels))} are ours")
        try:
            m.parse_pod_template(self.pod_template)
        except ValueError as exc:
            raise self.config_error("pod_template", str(exc)) from exc

    # ------------------------------------------------------------------ engine hooks

    async def _on_engine(self, coro: Coroutine[Any, Any, R]) -> R:
        """Await ``coro`` on the engine loop, held from this provisioner's first call
        until it no longer holds an API client (a full stop or a failed attach)."""
        if self._engine is None:
            self._engine = EngineLoop.hold(self)
        engine = self._engine
        try:
            return await engine.run(coro)
        finally:
            if self._client is None and self._engine is engine:
                self._engine = None
                engine.release(self)

    @on_engine_loop
    async def check_engine(self) -> None:
        await self._attach()
        try:
            await self._resolve_secret_refs()
        except BaseException:
            await self._detach()  # no start follows: let go of the client (and the loop)
            raise
        if self.sweep_on_start:
            await self._sweep_once()

    async def _resolve_secret_refs(self) -> None:
        """Read the Secrets that 'secret:NAME/KEY' settings reference, in our namespace."""
        assert self._client is not None
        for key in self.secret_settings:
            ref = kube_secret_ref(getattr(self, key))
            if ref is None:
                continue
            name, item = ref
            path = f"/api/v1/namespaces/{self.namespace}/secrets/{name}"
            try:
                secret = await self._client.request("GET", path)
                data = (secret.get("data") or {})[item]
            except (KubeApiError, KeyError) as exc:
                problem = f"cannot read key {item!r} of Secret {self.namespace}/{name}: {exc}"
                raise self.config_error(key, problem) from exc
            self.resolved_secrets[key] = base64.b64decode(data).decode()

    async def _attach(self, mode: str = "") -> None:
        """Hold the shared client and the namespace's reflector; resolve the connection mode."""
        if self._client is None:
            self._client = await acquire_client(self, self.kubeconfig, self.context)
            self._client.timeout = self.api_timeout
        try:
            reflector = self._client.reflectors.get(self.namespace)
            if reflector is None:
                reflector = PodReflector(self._client, self.namespace)
                self._client.reflectors[self.namespace] = reflector
            if not reflector.running:
                await reflector.start(timeout=self.api_timeout)
        except KubeApiError as exc:
            await self._detach()
            if exc.status == 0:
                msg = f"Kubernetes API unreachable: {exc}"
                raise EngineUnavailableError(msg, target=self.target) from exc
            msg = f"cannot watch pods in namespace {self.namespace!r}: {exc}"
            raise KernelStartError(msg, target=self.target, kernel_id=self.kernel_id) from exc
        self._reflector = reflector
        self._mode = mode or self._resolve_mode()

    def _resolve_mode(self) -> str:
        if self.connection_mode != "auto":
            return self.connection_mode
        assert self._client is not None
        return "pod-ip" if self._client.in_cluster else "port-forward"

    async def _detach(self) -> None:
        client, self._client, self._reflector = self._client, None, None
        if client is not None:
            await release_client(self, client)

    async def _sweep_once(self) -> None:
        assert self._client is not None
        key = (self.kubeconfig, self.context, self.namespace)
        await sweep_once(key, self._client, self.namespace, self.log, self.server_pod)

    @on_engine_loop
    async def sweep_orphans(self) -> list[str]:
        """Delete our pods and Secrets in the namespace whose server pod or process is gone."""
        await self._attach()
        try:
            assert self._client is not None
            removed = await sweep_orphans(self._client, self.namespace, self.log, self.server_pod)
        finally:
            await self._detach()
        return [f"{self.namespace}/{name}" for name in removed]

    async def preflight(self) -> list[str]:
        where = f"namespace {self.namespace!r}"
        try:
            client = await KubeClient.connect(self.kubeconfig, self.context)
        except Exception as exc:  # a missing or broken kubeconfig: only a warning here
            return [f"the Kubernetes API cannot be reached ({exc}); check kubeconfig/context"]
        try:
            await client.request(
                "GET", f"/api/v1/namespaces/{self.namespace}/pods", query=[("limit", "1")]
            )
        except KubeApiError as exc:
            if exc.status == 403:
                return [
                    f"pods in {where} cannot be listed (Forbidden): grant this server's "
                    "account the Role of the chart (pods, pods/exec, secrets) there, or "
                    "choose another namespace"
                ]
            if exc.status == 404:
                return [f"{where} does not exist: create it ('kubectl create namespace')"]
            return [f"cannot list pods in {where}: {exc}"]
        finally:
            await client.close()
        return []

    @on_engine_loop
    async def list_kernels(self) -> list[dict[str, Any]]:
        """Our kernel pods in the namespace."""
        await self._attach()
        try:
            assert self._client is not None
            return await list_kernel_pods(self._client, self.namespace)
        finally:
            await self._detach()

    def port_host(self) -> str:
        if self.host_network:
            return f"kubernetes-node:{self.node_name or '*'}"
        if self._mode == "port-forward":
            return LOCAL_HOST  # the pod ports double as the local listener ports
        return "kubernetes-pod"

    def port_sources(self) -> list[PortSource]:
        if not self.host_network or self._reflector is None or self._engine is None:
            return []
        return [HeldPorts(self._engine, self._reflector, self.node_name or None)]

    def kernel_bind_ip(self) -> str:
        return "0.0.0.0"

    def kernel_connection_file(self) -> str:
        return m.CONNECTION_FILE

    def _pod_spec(self, cmd: list[str], env: dict[str, str]) -> m.KernelPod:
        ports = tuple(int(self._kernel_info[n]) for n in PORT_NAMES)
        return m.KernelPod(
            name=self.pod_name,
            namespace=self.namespace,
            image=self.image,
            command=tuple(cmd),
            ports=ports,  # type: ignore[arg-type]
            kernel_id=self.kernel_id,
            secret_name=self.secret_name,
            owner=str(self.owner),
            username=env.get("KERNEL_USERNAME", ""),
            kernelspec=self.spec_name,
            owner_pod=self.server_pod,
            owner_reference=self.owner_references,
            release=self.release,
            pool=self.pool_id,
            env=dict(env),
            image_pull_policy=self.image_pull_policy,
            image_pull_secrets=tuple(self.image_pull_secrets),
            resources=m.Resources(
                self.cpu_request,
                self.cpu_limit,
                self.memory_request,
                self.memory_limit,
                self.gpus,
                self.gpu_resource,
            ),
            security=m.Security(
                self.run_as_user, self.run_as_group, self.fs_group, self.run_as_non_root
            ),
            scheduling=m.Scheduling(
                dict(self.node_selector),
                dict(self.affinity),
                tuple(self.tolerations),
                self.priority_class_name,
                self.host_network,
                self.node_name,
            ),
            volumes=tuple(self.volumes),
            volume_mounts=tuple(self.volume_mounts),
            service_account_name=self.service_account_name,
            automount_service_account_token=self.automount_service_account_token,
            labels=dict(self.labels),
            annotations=dict(self.annotations),
            working_dir=self.working_dir,
            grace_period=self.termination_grace_period,
            template=m.parse_pod_template(self.pod_template),
        )

    def build_manifests(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The pod and (unowned) Secret this provisioner would create; for inspection."""
        pod = m.pod_manifest(self._pod_spec(cmd, env))
        return pod, self._secret(kernel_info, None)

    def _secret(self, kernel_info: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
        labels = m.kernel_labels(self.kernel_id, str(self.owner), pool=self.pool_id)
        if self.release:
            labels[m.LABEL_RELEASE] = m.sanitize_label_value(self.release)
        content = connection_file_content(kernel_info, ip="0.0.0.0")
        secret = m.secret_manifest(self.secret_name, self.namespace, content, labels, owner)
        secret["metadata"]["annotations"] = m.kernel_annotations(
            self.kernel_id, str(self.owner), owner_pod=self.server_pod
        )
        return secret

    @on_engine_loop
    async def start_kernel(
        self, cmd: list[str], env: dict[str, str], kernel_info: dict[str, Any], **kwargs: Any
    ) -> None:
        await start_pod(self, cmd, env, kernel_info)

    @on_engine_loop
    async def claim_kernel(self, pool_id: str) -> None:
        await claim_pod(self, pool_id)

    @on_engine_loop
    async def kernel_address(self) -> tuple[str, dict[str, int]]:
        if self._mode == "port-forward":
            if self._forwarder is None or not self._forwarder.local_ports:
                await open_forwarder(self)
            assert self._forwarder is not None
            return "127.0.0.1", dict(zip(PORT_NAMES, self._forwarder.local_ports, strict=True))
        ports = {n: int(self._kernel_info[n]) for n in PORT_NAMES}
        if not self.pod_ip_relay:
            return self.pod_ip, ports
        if self._relay is None:  # on the engine loop, which runs between callers' calls
            self._relay = self.kernel_relay(KUBERNETES_EXECUTOR, self.api_timeout)
        return await self._relay.follow(self.pod_ip, ports, f"pod {self.pod_name}")

    async def poll_kernel(self) -> int | None:
        # a read of the reflector's cache (replaced, never changed in place, by the loop)
        if self._reflector is None or not self.pod_name:
            return 0
        return kernel_exit_code(self._reflector.get(self.pod_name))

    @on_engine_loop
    async def signal_kernel(self, signum: int) -> None:
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
                    timeout=self.api_timeout,
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
        await self._delete_pod(1 if force else self.termination_grace_period)

    async def _delete_pod(self, grace: int) -> None:
        """Delete the pod with ``grace`` seconds, at least 1 (as kubectl does): a forced
        delete (0) drops the object while the kubelet may still run the kernel."""
        if not self.pod_name or self._client is None:
            return
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"
        grace = max(1, int(grace))
        query = [("gracePeriodSeconds", str(grace)), ("propagationPolicy", "Background")]
        try:
            await self._client.request("DELETE", path, query=query)
        except KubeApiError as exc:
            if exc.status != 404:
                raise ProvisionerError(
                    f"cannot delete pod {self.pod_name}: {exc}",
                    target=self.target,
                    kernel_id=self.kernel_id,
                ) from exc

    @on_engine_loop
    async def remove_kernel(self, restart: bool) -> None:
        name = self.pod_name
        failed, self.start_failed = self.start_failed, False
        if self._relay is not None:
            await self._relay.pause()  # clients reconnect, and wait, until the next pod runs
        try:
            if name:  # raises, keeping the pod's name, when the API refuses the delete
                if self._client is None or self._reflector is None:
                    await self._attach(self._mode)
                await self._delete_pod(1)
                assert self._client is not None
                secret = f"/api/v1/namespaces/{self.namespace}/secrets/{self.secret_name}"
                try:
                    await self._client.request("DELETE", secret)
                except KubeApiError as exc:  # owned by the pod: the cluster deletes it too
                    if exc.status != 404:
                        self.log.warning("Kernel %s: secret not deleted: %s", self.kernel_id, exc)
                if (not restart or self.host_network) and self._reflector is not None:
                    await self._confirm_removed(name, restart, failed)
            self.pod_name = self.pod_uid = self.pod_ip = self.secret_name = ""
            self._started = False
        finally:
            if not restart:
                if self._forwarder is not None:
                    await self._forwarder.stop()
                    self._forwarder = None
                if self._relay is not None:
                    relay, self._relay = self._relay, None
                    await relay.close()
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
            lambda: reflector.get(name) is None, timeout=self.api_timeout + 5
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
        if not state.get("pod"):
            return
        self.namespace = state.get("namespace") or self.namespace
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
            self._started = False
            return
        self.pod_ip = (pod.get("status") or {}).get("podIP", "") or state.get("pod_ip", "")
        self._started = kernel_exit_code(pod) is None
        self.log.info("Kernel %s: reattached to pod %s", self.kernel_id, self.pod_name)


__all__ = ["KubernetesClusterProvisioner", "sweep_orphans"]

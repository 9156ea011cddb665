"""The Kubernetes target's settings and their checks (the provisioner is in
:mod:`.provisioner`, the engine that reads them in :mod:`.engine`).

Pod fields are documented as the Kubernetes API documents them, with an example in the
kernelspec's ``kernel_provisioner.config`` form (JSON).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, ClassVar

from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode, Union, default

from ..lifecycle.owner import ServerPod
from ..settings import SharedSettings
from ..usernames import PLACEHOLDER, uses_username
from . import manifests as m
from .client import default_namespace

if TYPE_CHECKING:
    from ..parameters import LaunchParameters


class KubernetesSettings(SharedSettings):
    """What a Kubernetes kernelspec may set: the image, the namespace, how the server
    reaches the pod, the pod's fields, and who owns it."""

    kube_secret_refs: ClassVar[bool] = True
    #: Settings where ``{username}`` stands for the kernel's user (a DNS label in names, a
    #: path segment in paths).
    username_settings: ClassVar[tuple[str, ...]] = (
        "namespace",
        "volumes",
        "volume_mounts",
        "working_dir",
        "env",
    )
    launch_resources: ClassVar[tuple[str, ...]] = ("cpu", "memory", "gpus", "image")

    # ------------------------------------------------------------------ where and how

    image = Unicode(
        "",
        config=True,
        help="""Image of the kernel container (required). Any image with a stock Jupyter
        kernel works: the kernel reads its connection file from a memory volume, so the
        image needs no launcher of ours. Example: "image":
        "quay.io/jupyter/scipy-notebook:2024-05-27".""",
    )
    image_pull_policy = CaselessStrEnum(
        ["Always", "IfNotPresent", "Never"],
        default_value="IfNotPresent",
        config=True,
        help="""imagePullPolicy of the kernel's containers: 'Always' asks the registry at
        every start, 'IfNotPresent' pulls only an image the node lacks, 'Never' uses the
        node's copy or fails the start (ErrImageNeverPull). Example: "image_pull_policy":
        "Always" for a moving tag such as 'latest'.""",
    )
    image_pull_secrets = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Names of Secrets (of type kubernetes.io/dockerconfigjson, in the kernel's
        namespace) the kubelet uses to pull the image from a private registry; the pod's
        imagePullSecrets. Example: "image_pull_secrets": ["registry-credentials"].""",
    )
    namespace = Unicode(
        config=True,
        help="""Namespace of the kernel pods. Default: $CLUSTER_PROVISIONERS_NAMESPACE, else the
        server pod's own namespace when in a cluster, else 'default'. '{username}' stands
        for the kernel's user (KERNEL_USERNAME) as a DNS label ('Alice_B' becomes
        'alice-b--<hash>'); such namespaces must exist and grant the server the chart's
        Role. Example: "namespace": "kernels-{username}".""",
    )
    kubeconfig = Unicode(
        "",
        config=True,
        help="""kubeconfig file to use. Default: $KUBECONFIG, else the service account when the
        server runs in a pod, else ~/.kube/config.""",
    )
    context = Unicode(
        "",
        config=True,
        help="""Context of the kubeconfig to use (its cluster, user and namespace); default:
        the kubeconfig's current-context. Example: "context": "kind-dev".""",
    )
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
    port_forward_protocol = CaselessStrEnum(
        ["spdy", "websocket"],
        default_value="spdy",
        config=True,
        help="""How a 'port-forward' connection goes through the API server. 'spdy': one
        SPDY/3.1 connection per kernel pod carries all of its client connections, as
        kubectl's port-forward does (if the API server, or a proxy in between, refuses
        the upgrade, the server logs it once and uses websockets instead). 'websocket':
        one websocket per client connection (a kernel's client holds four or five).""",
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
    api_timeout = Float(
        10.0,
        config=True,
        help="""Seconds each Kubernetes API request (and each exec or port-forward websocket
        handshake) may take before it counts as failed; idempotent requests are then
        retried a few times.""",
    )

    # ------------------------------------------------------------------ resources

    cpu_request = Unicode(
        "",
        config=True,
        help="""CPU the scheduler reserves for the kernel container (resources.requests.cpu), as
        a Kubernetes quantity: cores or millicores. Empty: none (the namespace's
        LimitRange default, if any). Example: "cpu_request": "500m".""",
    )
    cpu_limit = Unicode(
        "",
        config=True,
        help="""Most CPU the kernel container may use (resources.limits.cpu); beyond it the
        kernel is throttled, not killed. Empty: no limit. Example: "cpu_limit": "2".""",
    )
    memory_request = Unicode(
        "",
        config=True,
        help="""Memory the scheduler reserves for the kernel container
        (resources.requests.memory), as a quantity. Empty: none. Example:
        "memory_request": "1Gi".""",
    )
    memory_limit = Unicode(
        "",
        config=True,
        help="""Most memory the kernel container may use (resources.limits.memory); a kernel
        that goes beyond it is OOM-killed and the kernel dies. Empty: no limit. Example:
        "memory_limit": "4Gi".""",
    )
    gpus = Int(
        0,
        config=True,
        help="""GPUs for the kernel: a limit of 'gpu_resource' (the cluster's device plugin
        must offer it). 0: none. Example: "gpus": 1.""",
    )
    gpu_resource = Unicode(
        m.GPU_RESOURCE,
        config=True,
        help="""Extended resource name that 'gpus' asks for, as the cluster's device plugin
        advertises it. Example: "gpu_resource": "amd.com/gpu".""",
    )

    # ------------------------------------------------------------------ scheduling

    node_selector = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""nodeSelector of the pod: labels a node must carry for the kernel to run on it
        (all of them). Example: "node_selector": {"kubernetes.io/arch": "amd64",
        "node-pool": "notebooks"}.""",
    )
    affinity = Dict(
        default_value={},
        config=True,
        help="""affinity of the pod, in its Kubernetes form (nodeAffinity, podAffinity,
        podAntiAffinity), for rules a nodeSelector cannot say (preferences, 'In' lists).
        Example: "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
        {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In",
        "values": ["a100", "h100"]}]}]}}}.""",
    )
    tolerations = List(
        Dict(),
        default_value=[],
        config=True,
        help="""tolerations of the pod: the taints of nodes it may still be scheduled on (as
        for nodes reserved for notebooks or GPUs). Example: "tolerations": [{"key":
        "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}].""",
    )
    priority_class_name = Unicode(
        "",
        config=True,
        help="""priorityClassName of the pod: the PriorityClass that decides which pods the
        scheduler evicts first when the cluster is full. Empty: the cluster's default.
        Example: "priority_class_name": "notebook-low".""",
    )
    host_network = Bool(
        False,
        config=True,
        help="""Run the kernel in the node's network namespace. Its ports are then allocated per
        node ('node_name' pins the node) or, without 'node_name', kept unique across all our
        hostNetwork pods of the namespace, since the node is only known after scheduling.""",
    )
    node_name = Unicode(
        "",
        config=True,
        help="""Pin the pod to this node (as a kubernetes.io/hostname nodeSelector, so the
        scheduler still checks resources and taints). Empty: any node. Example:
        "node_name": "worker-3".""",
    )
    fail_on_unschedulable = Bool(
        True,
        config=True,
        help="""Fail the start at once when the scheduler reports the pod Unschedulable; turn off
        with a cluster autoscaler that adds nodes.""",
    )

    # ------------------------------------------------------------------ pod and container

    volumes = List(
        Dict(),
        default_value=[],
        config=True,
        help="""Extra volumes of the pod, in their Kubernetes form (mount them with
        'volume_mounts'). '{username}' stands for the kernel's user: a DNS label in names
        (a claimName), a path segment under 'path' (hostPath, nfs). Example: "volumes":
        [{"name": "data", "persistentVolumeClaim": {"claimName": "team-data"}}], or
        [{"name": "home", "persistentVolumeClaim": {"claimName": "home-{username}"}}]
        (see 'user_volume_mount_path' for a claim created per user).""",
    )
    volume_mounts = List(
        Dict(),
        default_value=[],
        config=True,
        help="""Extra volumeMounts of the kernel container: where the 'volumes' appear in it.
        '{username}' works as in 'volumes' (a path segment in mountPath and subPath).
        Example: "volume_mounts": [{"name": "data", "mountPath": "/home/jovyan/data",
        "readOnly": true}], or one shared volume, a directory per user: [{"name": "homes",
        "mountPath": "/home/jovyan/work", "subPath": "{username}"}].""",
    )
    user_volume_mount_path = Unicode(
        "",
        config=True,
        help="""Where each kernel of a user mounts that user's own PersistentVolumeClaim
        ('user_volume_claim'), created before the user's first pod if missing and never
        deleted with a kernel (it is the user's data: delete it yourself). Empty: no
        volume per user. Needs 'create' and 'get' on persistentvolumeclaims (the chart's
        kernels.userVolume). Example: "/home/jovyan/work".""",
    )
    user_volume_claim = Unicode(
        "claim-{username}",
        config=True,
        help="""Name of a user's PersistentVolumeClaim ('user_volume_mount_path'); '{username}'
        is the kernel's user as a DNS label. Example: "home-{username}".""",
    )
    user_volume_size = Unicode(
        "1Gi",
        config=True,
        help="""Storage a user's claim requests when it is created (a quantity). Example:
        "10Gi".""",
    )
    user_volume_storage_class = Unicode(
        "",
        config=True,
        help="""storageClassName of a user's claim when it is created. Empty: the cluster's
        default class. Example: "standard".""",
    )
    service_account_name = Unicode(
        "",
        config=True,
        help="""serviceAccountName of the pod: the account the kernel's pod runs as (what a
        token would grant, and e.g. cloud workload identity). Empty: the namespace's
        'default'. Example: "service_account_name": "notebook-reader".""",
    )
    automount_service_account_token = Bool(
        False,
        config=True,
        help="""Mount the service account's API token into the kernel container
        (automountServiceAccountToken). Off by default: a kernel runs user code, which
        then cannot talk to the API. Turn on only for an account with a role made for
        kernels.""",
    )
    run_as_user = Int(
        1000,
        allow_none=True,
        config=True,
        help="""runAsUser of the kernel's containers: the uid the kernel runs as. None: the
        image's own user. Example: "run_as_user": 1000 (jovyan in the Jupyter images).""",
    )
    run_as_group = Int(
        1000,
        allow_none=True,
        config=True,
        help="""runAsGroup of the kernel's containers: the primary gid the kernel runs as.
        None: the image's own group. Example: "run_as_group": 100 (users in the Jupyter
        images).""",
    )
    fs_group = Int(
        1000,
        allow_none=True,
        config=True,
        help="""fsGroup of the pod: the group that owns its volumes; it lets the kernel's user
        read the connection Secret and write to the volumes. None: no fsGroup (then the
        kernel runs as root or reads no Secret). Example: "fs_group": 100.""",
    )
    run_as_non_root = Bool(
        True,
        config=True,
        help="""runAsNonRoot of the kernel's containers: the kubelet refuses to start an image
        whose user is root (uid 0), and the start fails saying so. Turn off only for
        images that must run as root.""",
    )
    labels = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra labels of the kernel pod, for selectors and policies of the cluster
        (values are sanitized to the label charset; our own labels cannot be set here).
        Example: "labels": {"team": "data-science", "cost-center": "42"}.""",
    )
    annotations = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra annotations of the kernel pod, for tools that read them (service
        meshes, cost reports). Example: "annotations": {"sidecar.istio.io/inject":
        "false"}.""",
    )
    pod_template = Union(
        [Unicode(), Dict()],
        default_value="",
        config=True,
        help="""A Pod (YAML text or a mapping) merged over the built pod: mappings merge, lists of
        named items (containers, env, volumes) merge by name, other values replace. The
        kernel container is named 'kernel'. Name, namespace, our labels, the connection
        volumes and the kernel's command are kept.""",
    )
    pod_name_prefix = Unicode(
        "kernel",
        config=True,
        help="""Pod names are '<prefix>-<random hex>' (a DNS-1123 label: at most 24 lowercase
        letters, digits and '-'); the Secret is named after the pod. Example:
        "pod_name_prefix": "nb-kernel".""",
    )
    working_dir = Unicode(
        "",
        config=True,
        help="""Working directory of the kernel container (workingDir): where the kernel
        starts and relative paths resolve. Empty: the image's. '{username}' stands for the
        kernel's user as a path segment. Example: "working_dir": "/home/jovyan/work",
        "/home/{username}".""",
    )
    termination_grace_period = Int(
        5,
        config=True,
        help="""Seconds a kernel pod gets between SIGTERM and SIGKILL when it is shut down
        (terminationGracePeriodSeconds); a forced kill gives it 1. Example:
        "termination_grace_period": 30 for kernels that save state on exit.""",
    )

    # ------------------------------------------------------------------ start

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

    # ------------------------------------------------------------------ ownership

    server_pod = Unicode(
        config=True,
        help="""'namespace/name/uid' of the pod this server runs in, recorded on every kernel pod
        so that a sweep can ask the API whether the owner still exists. Default: from
        $POD_NAMESPACE, $POD_NAME and $POD_UID (the chart sets them through the downward
        API); empty outside a pod.""",
    )
    owner_references = Bool(
        True,
        config=True,
        help="""Make the server pod ('server_pod') the owner of kernel pods in its own namespace,
        so the cluster deletes them (and their Secrets) with it. Kernels in other namespaces
        cannot have an owner there; the sweep and the chart's uninstall hook remove those.""",
    )
    release = Unicode(
        config=True,
        help="""Name of the installation this server belongs to, put on every kernel pod and
        Secret as the label 'cluster-provisioners/release' so that 'jupyter-provisioners
        cleanup --release' removes them all (the chart's uninstall hook does). Default:
        $CLUSTER_PROVISIONERS_RELEASE.""",
    )

    def settings_using_username(self) -> list[str]:
        """The settings that vary by user: those using '{username}', and the user's claim."""
        used = [name for name in self.username_settings if uses_username(getattr(self, name))]
        return used + (["user_volume_mount_path"] if self.user_volume_mount_path else [])

    @default("namespace")
    def _namespace_default(self) -> str:
        return default_namespace()

    @default("server_pod")
    def _server_pod_default(self) -> str:
        pod = ServerPod.from_env()
        return "" if pod is None else str(pod)

    @default("release")
    def _release_default(self) -> str:
        return os.environ.get("CLUSTER_PROVISIONERS_RELEASE", "")

    def launch_settings(self, params: LaunchParameters) -> dict[str, Any]:
        """cpu → ``cpu_request`` and ``cpu_limit`` (millicores), memory →
        ``memory_request`` and ``memory_limit`` (the quantity as given, or bytes), gpus →
        ``gpus``, image → ``image``: the kernel is guaranteed what it asked for. Pure;
        never raises."""
        found: dict[str, Any] = {}
        if params.cpu is not None:
            millicores = max(1, math.ceil(params.cpu * 1000 - 1e-6))
            cpu = str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"
            found["cpu_request"] = found["cpu_limit"] = cpu
        if params.memory_bytes is not None:
            given = params.values.get("memory")
            memory = given if isinstance(given, str) else str(params.memory_bytes)
            found["memory_request"] = found["memory_limit"] = memory
        if params.gpus is not None:
            found["gpus"] = params.gpus
        if params.image is not None:
            found["image"] = params.image
        return found

    def validate_config(self) -> None:
        super().validate_config()
        if not self.image:
            raise self.config_error("image", "required: the kernel image the pod runs")
        if not m.is_dns_label(self.namespace.replace(PLACEHOLDER, "u")):
            raise self.config_error("namespace", f"{self.namespace!r} is not a DNS-1123 label")
        if not m.is_dns_label(self.user_volume_claim.replace(PLACEHOLDER, "u")):
            raise self.config_error(
                "user_volume_claim", f"{self.user_volume_claim!r} is not a DNS-1123 label"
            )
        if self.user_volume_mount_path and not self.user_volume_mount_path.startswith("/"):
            raise self.config_error("user_volume_mount_path", "must be an absolute path")
        if not m.is_quantity(self.user_volume_size):
            raise self.config_error(
                "user_volume_size", f"{self.user_volume_size!r} is not a quantity (e.g. '10Gi')"
            )
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
        ours = set(m.kernel_labels("x", "x", "x", "x")) | {m.LABEL_RELEASE, m.LABEL_PERSIST}
        if ours & set(self.labels):
            raise self.config_error("labels", f"{sorted(ours & set(self.labels))} are ours")
        try:
            m.parse_pod_template(self.pod_template)
        except ValueError as exc:
            raise self.config_error("pod_template", str(exc)) from exc

"""Who owns a kernel pod, in terms the cluster can answer for: the server's pod.

The settings live here, apart from the provisioner's others; :mod:`.manifests` records
them on the pod (annotation, ownerReference, release label) and :mod:`.sweep` checks the
owner pod against the API.
"""

from __future__ import annotations

import os

from traitlets import Bool, Unicode, default

from ..lifecycle.base import ClusterProvisioner
from ..lifecycle.owner import ServerPod


class PodOwnership(ClusterProvisioner):
    """The Kubernetes provisioner's ownership settings (its base class)."""

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

    @default("server_pod")
    def _server_pod_default(self) -> str:
        pod = ServerPod.from_env()
        return "" if pod is None else str(pod)

    @default("release")
    def _release_default(self) -> str:
        return os.environ.get("CLUSTER_PROVISIONERS_RELEASE", "")

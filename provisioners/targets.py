"""The targets the CLI knows, and the kernelspecs that select them."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

#: target name -> (entry point name, "module:Class")
TARGETS: dict[str, tuple[str, str]] = {
    "local": ("cluster-local-provisioner", "provisioners.local:LocalClusterProvisioner"),
    "docker": ("cluster-docker-provisioner", "provisioners.docker:DockerClusterProvisioner"),
    "ssh": ("cluster-ssh-provisioner", "provisioners.ssh:SSHClusterProvisioner"),
    "kubernetes": (
        "cluster-kubernetes-provisioner",
        "provisioners.k8s.provisioner:KubernetesClusterProvisioner",
    ),
}
ENTRY_POINTS = {entry_point: name for name, (entry_point, _) in TARGETS.items()}


def load_target(name: str) -> Any:
    """The provisioner class of target ``name``."""
    module, _, attr = TARGETS[name][1].partition(":")
    return getattr(importlib.import_module(module), attr)


def our_kernelspecs(kernel_dirs: list[str] | None = None) -> Iterator[tuple[str, KernelSpec]]:
    """(name, spec) of every installed kernelspec that selects one of our provisioners."""
    ksm = KernelSpecManager(kernel_dirs=kernel_dirs) if kernel_dirs else KernelSpecManager()
    for name in sorted(ksm.find_kernel_specs()):
        try:
            spec = ksm.get_kernel_spec(name)
        except Exception:  # a broken kernelspec elsewhere is not ours to report
            continue
        stanza = spec.metadata.get("kernel_provisioner", {})
        if stanza.get("provisioner_name") in ENTRY_POINTS:
            yield name, spec


def provisioner_for(spec: KernelSpec) -> Any:
    """An (unstarted) provisioner built from ``spec``'s stanza, for sweeps and listings."""
    stanza = spec.metadata["kernel_provisioner"]
    cls = load_target(ENTRY_POINTS[stanza["provisioner_name"]])
    return cls(kernel_id="maintenance", kernel_spec=spec, **stanza.get("config", {}))

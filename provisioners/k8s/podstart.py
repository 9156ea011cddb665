"""Starting a kernel pod: create it and its Secret, follow it until the kernel answers.

The start records each resource on the provisioner the moment it exists (so a failed
start can be undone), waits on the namespace's reflector until the kernel container
runs, logs the pod's events as progress, and fails at once, in the cluster's own words
(with the container's log tail), on image-pull errors, an unschedulable pod, a crash or
a 403. With ``wait_for_port`` it then waits until the kernel's shell port answers, on
the pod IP or through the port-forward, which is opened here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

from ..connection.ports import LOCAL_HOST, zmq_listens
from ..exceptions import KernelStartError
from ..lifecycle.engine import PORT_NAMES
from . import manifests as m
from .client import KubeApiError
from .portforward import PortForwarder
from .watch import StartProblem, describe_progress, kernel_running, pod_events, start_problem

if TYPE_CHECKING:
    from .provisioner import KubernetesClusterProvisioner

_PROGRESS_REASONS = frozenset({"Scheduled", "Pulling", "Pulled", "Created", "Started"})


async def start_pod(
    p: KubernetesClusterProvisioner,
    cmd: list[str],
    env: dict[str, str],
    kernel_info: dict[str, Any],
) -> None:
    """Create the pod and its Secret, then wait until the kernel runs (and, with
    ``wait_for_port``, until its shell port answers); record each resource on ``p``."""
    if p._client is None or p._reflector is None:
        await p._attach(p._mode)
    p.timings = {"start": time.perf_counter()}
    # a warm kernel's pod is named after its pool id for good: a claim cannot rename it
    p.pod_name = m.pod_name(p.pod_name_prefix, p.pool_id or uuid.uuid4().hex)
    p.secret_name = m.secret_name_for(p.pod_name)
    p.pod_uid = p.pod_ip = ""
    pod = m.pod_manifest(p._pod_spec(cmd, env))
    created = await create(p, "pods", pod)
    p.progress("pod created", f"{p.namespace}/{p.pod_name} (image {p.image}, {p._mode})")
    p.timings["created"] = time.perf_counter()
    p.pod_uid = created["metadata"]["uid"]
    p._started = True
    await create(p, "secrets", p._secret(kernel_info, created))
    events = asyncio.create_task(follow_events(p, p.pod_name))
    try:
        running = await wait_running(p)
    finally:
        events.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await events
    p.timings["running"] = time.perf_counter()
    p.progress(
        "pod running",
        f"{p.namespace}/{p.pod_name} on {running.get('spec', {}).get('nodeName') or '?'}",
    )
    p.pod_ip = (running.get("status") or {}).get("podIP", "")
    if p._mode == "port-forward":
        await open_forwarder(p)
    if p.wait_for_port:
        await wait_for_shell(p)
        p.timings["listening"] = time.perf_counter()
        if p._forwarder is not None:
            p._forwarder.prime()


async def create(
    p: KubernetesClusterProvisioner, kind: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST ``body``; retried on transient errors (409 on a retry means it was created)."""
    assert p._client is not None
    path = f"/api/v1/namespaces/{p.namespace}/{kind}"
    name = body["metadata"]["name"]
    delay = 0.2
    for attempt in range(3):
        try:
            return await p._client.request("POST", path, body=body)
        except KubeApiError as exc:
            if exc.status == 409 and attempt:  # a list, not a get: the Role grants no get
                query = [("fieldSelector", f"metadata.name={name}")]
                found = await p._client.request("GET", path, query=query)
                if found.get("items"):
                    return dict(found["items"][0])
            if exc.status in (0, 429, 500, 502, 503, 504) and attempt < 2:
                await asyncio.sleep(delay)
                delay *= 2
                continue
            what = "Forbidden (check the RBAC rules)" if exc.status == 403 else exc.reason
            msg = f"cannot create {kind[:-1]} {p.namespace}/{name}: {what}: {exc}"
            raise KernelStartError(msg, target=p.target, kernel_id=p.kernel_id) from exc
    raise AssertionError("unreachable")  # pragma: no cover


async def wait_running(p: KubernetesClusterProvisioner) -> dict[str, Any]:
    """Wait on the reflector until the kernel container runs; fail fast on a lost cause."""
    reflector = p._reflector
    assert reflector is not None
    name, last = p.pod_name, ""
    seen = False
    try:
        while True:
            pod = reflector.get(name)
            if pod is not None and pod["metadata"].get("uid") == p.pod_uid:
                seen = True
                problem = start_problem(pod, unschedulable_fails=p.fail_on_unschedulable)
                if problem is not None:
                    await fail(p, problem)
                if kernel_running(pod):
                    return pod
                progress = describe_progress(pod)
                if progress != last:
                    p.progress("pod status", progress)
                    last = progress
            elif pod is None and seen:
                msg = f"kernel pod {p.namespace}/{name} was deleted while starting"
                raise KernelStartError(msg, target=p.target, kernel_id=p.kernel_id)
            before = pod

            def changed(before: dict[str, Any] | None = before) -> bool:
                return reflector.get(name) is not before

            await reflector.wait_for(changed, timeout=2.0)
    except asyncio.CancelledError:
        p.log.warning("Kernel %s: pod %s not running in time (%s)", p.kernel_id, name, last or "?")
        raise


async def fail(p: KubernetesClusterProvisioner, problem: StartProblem) -> NoReturn:
    """Raise the start failure for ``problem``, with the container's log tail."""
    msg = f"kernel pod {p.namespace}/{p.pod_name} failed to start: {problem}"
    if problem.wants_logs and problem.container:
        tail = await log_tail(p, problem.container)
        if tail:
            msg += f"\n--- last lines of its log ---\n{tail}"
    raise KernelStartError(msg, target=p.target, kernel_id=p.kernel_id)


async def follow_events(p: KubernetesClusterProvisioner, name: str) -> None:
    """Log the pod's events (scheduled, pulling, started, warnings) while it starts."""
    assert p._client is not None
    try:
        await _log_events(p, name)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # progress logs never fail a start
        p.log.debug("Kernel %s: events of pod %s: %r", p.kernel_id, name, exc)


async def _log_events(p: KubernetesClusterProvisioner, name: str) -> None:
    assert p._client is not None
    async for event in pod_events(p._client, p.namespace, name):
        reason, text = event.get("reason", ""), event.get("message", "")
        if event.get("type") == "Warning":
            # the kubelet may try the Secret volume before we created the Secret
            if reason == "FailedMount" and p.secret_name in text:
                p.log.debug("Kernel %s: pod %s: %s: %s", p.kernel_id, name, reason, text)
            else:
                p.progress(f"warning {reason}", text)
        elif reason in _PROGRESS_REASONS:
            p.progress(reason, text)


async def log_tail(p: KubernetesClusterProvisioner, container: str, lines: int = 20) -> str:
    """The last lines of ``container``'s log ('' when it cannot be read)."""
    assert p._client is not None
    path = f"/api/v1/namespaces/{p.namespace}/pods/{p.pod_name}/log"
    query = [("container", container), ("tailLines", str(lines))]
    try:
        return (await p._client.request_text(path, query)).strip()
    except KubeApiError as exc:
        p.log.debug("Kernel %s: no log of %s: %s", p.kernel_id, container, exc)
        return ""


async def open_forwarder(p: KubernetesClusterProvisioner) -> None:
    assert p._client is not None
    remote = [int(p._kernel_info[n]) for n in PORT_NAMES]
    if p._forwarder is not None:
        p._forwarder.retarget(p.pod_name)
        if p._forwarder.remote_ports == remote and p._forwarder.local_ports:
            return
        await p._forwarder.stop()
    local = remote if p._port_host == LOCAL_HOST else [0] * len(remote)
    p._forwarder = PortForwarder(
        p._client,
        p.namespace,
        p.pod_name,
        remote,
        local,
        connect_timeout=p.api_timeout,
        logger=p.log,
    )
    await p._forwarder.start()


async def wait_for_shell(p: KubernetesClusterProvisioner) -> None:
    """Wait until the shell port answers; fail (with the log) if the kernel ends first."""
    reflector = p._reflector
    assert reflector is not None
    port = int(p._kernel_info["shell_port"])
    try:
        while True:
            pod = reflector.get(p.pod_name)
            if pod is None:
                msg = f"kernel pod {p.namespace}/{p.pod_name} was deleted while starting"
                raise KernelStartError(msg, target=p.target, kernel_id=p.kernel_id)
            problem = start_problem(pod)
            if problem is not None:
                await fail(p, problem)
            if p._forwarder is not None:
                if await probe_forwarded(p):
                    return
            elif await zmq_listens(p.pod_ip, port, timeout=1.0):
                return
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        where = "through the port-forward" if p._forwarder else f"on {p.pod_ip}:{port}"
        p.log.warning(
            "Kernel %s: pod %s runs but its shell port never answered %s%s",
            p.kernel_id,
            p.pod_name,
            where,
            "" if p._forwarder else " (is the pod network reachable from this server?)",
        )
        raise


async def probe_forwarded(p: KubernetesClusterProvisioner) -> bool:
    """Probe the shell port through the forward; a refused port-forward fails the start."""
    assert p._forwarder is not None
    try:
        return await p._forwarder.probe(0)
    except KubeApiError as exc:
        if exc.status in (401, 403):
            msg = (
                f"port-forward to kernel pod {p.namespace}/{p.pod_name} refused "
                f"(grant pods/portforward, or use connection_mode='pod-ip'): {exc}"
            )
            raise KernelStartError(msg, target=p.target, kernel_id=p.kernel_id) from exc
        return False

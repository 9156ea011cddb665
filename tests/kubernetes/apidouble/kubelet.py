"""The double's kubelet: one PodWorker per scheduled pod runs it on docker (a pause
container for the pod's namespaces and volumes, init containers in order, then the
main containers with restart policy and back-off) and publishes the pod status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

import docker.errors
from docker.types import Mount

from . import podspec
from .meta import JSON, parse_docker_time, rfc3339
from .podspec import ConfigError
from .podstatus import ConditionClock, ContainerRecord, normalize_image, pod_phase
from .runtime import Sandbox, VolumePlan

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger(__name__)

#: Waiting reasons of a container whose image cannot be pulled.
PULL_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff"})


class PodWorker:
    """Runs one pod; ``terminate`` stops it. Status goes to the store as it changes."""

    def __init__(self, cluster: Cluster, pod: JSON) -> None:
        self.cluster = cluster
        self.rt = cluster.runtime
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        spec = pod["spec"]
        self.policy = spec.get("restartPolicy", "Always")
        waiting = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
        self.records = [
            ContainerRecord(c, True, {"waiting": {"reason": "PodInitializing"}})
            for c in spec.get("initContainers") or []
        ] + [
            ContainerRecord(c, False, {"waiting": {"reason": waiting}}) for c in spec["containers"]
        ]
        self.sandbox: Sandbox | None = None
        self.volumes: list[VolumePlan] = []
        self.init_done = not spec.get("initContainers")
        self.final_phase: str | None = None
        self.final_reason: tuple[str, str] | None = None
        self.terminating = False
        self.task: asyncio.Task[None] | None = None
        self.started_at = rfc3339()
        self.term_dir = cluster.workdir / "termination" / self.uid
        self.clock = ConditionClock()

    # -- helpers -------------------------------------------------------------------------
    def pod(self) -> JSON | None:
        pod = self.cluster.store.get("pods", self.ns, self.name)
        return pod if pod and pod["metadata"]["uid"] == self.uid else None

    def event(
        self, reason: str, message: str, kind: str = "Normal", rec: ContainerRecord | None = None
    ) -> None:
        pod = self.pod()
        if pod is not None:
            path = None
            if rec is not None:
                path = f"spec.{'initContainers' if rec.init else 'containers'}{{{rec.name}}}"
            self.cluster.record_event(pod, reason, message, kind, field_path=path)

    @property
    def mains(self) -> list[ContainerRecord]:
        return [r for r in self.records if not r.init]

    @property
    def stuck_in_pull(self) -> bool:
        """True while a container waits for an image that cannot be pulled (a real
        kubelet's pod worker is then busy pulling: a delete waits for it)."""
        return any(
            (r.state.get("waiting") or {}).get("reason") in PULL_FAILURES for r in self.records
        )

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod {self.ns}/{self.name}")

    async def _run(self) -> None:
        try:
            self.publish()
            await self._mount_and_sandbox()
            if await self._run_init_containers():
                await self._run_main_containers()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("k8s double: pod %s/%s failed", self.ns, self.name)
            self.event("FailedSync", f"error syncing pod in the k8s double: {exc}", "Warning")

    # -- status --------------------------------------------------------------------------
    def phase(self) -> str:
        if self.final_phase:
            return self.final_phase
        if not self.init_done:
            return "Pending"
        return pod_phase(self.mains, self.policy)

    def publish(self) -> None:
        """Write the current status into the pod object (a MODIFIED event if it changed)."""
        phase = self.phase()
        conditions = self.clock.conditions(
            self.records, phase, self.init_done, self.sandbox is not None
        )

        def update(pod: JSON) -> None:
            status = pod["status"]
            status["phase"] = phase
            old = [c for c in status.get("conditions") or [] if c["type"] == "PodScheduled"]
            status["conditions"] = conditions + old
            status["hostIP"] = self.cluster.node_ip
            status["hostIPs"] = [{"ip": self.cluster.node_ip}]
            status["startTime"] = self.started_at
            if self.sandbox is not None:
                ip = self.cluster.node_ip if self.sandbox.host_network else self.sandbox.ip
                status["podIP"], status["podIPs"] = ip, [{"ip": ip}]
            if any(r.init for r in self.records):
                status["initContainerStatuses"] = [r.status() for r in self.records if r.init]
            status["containerStatuses"] = [r.status() for r in self.mains]
            if self.final_reason:
                status["reason"], status["message"] = self.final_reason

        if self.pod() is not None:
            self.cluster.store.mutate("pods", self.ns, self.name, update)

    # -- volumes and sandbox -------------------------------------------------------------
    async def _mount_and_sandbox(self) -> None:
        pod = self.pod()
        assert pod is not None
        spec = pod["spec"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        delay = 0.5
        while True:
            problem = self._mount_problem(spec, fs_group)
            if problem is None:
                break
            self.event("FailedMount", problem, "Warning")
            kinds = ("secrets", "configmaps", "persistentvolumeclaims")
            await self.cluster.store.wait_change(kinds, self.ns, delay)
            delay = min(delay * 2, 8.0)
        self.volumes = []
        for vol in spec.get("volumes") or []:
            kind = next(k for k in podspec.SUPPORTED_VOLUMES if k in vol)
            if kind == "persistentVolumeClaim":
                self.volumes.append(self._claim_plan(vol))
                continue
            medium = (vol.get("emptyDir") or {}).get("medium") == "Memory"
            size = (vol.get("emptyDir") or {}).get("sizeLimit")
            self.volumes.append(
                VolumePlan(
                    vol["name"],
                    f"k8s-double-{self.uid}-{vol['name']}",
                    kind,
                    kind != "emptyDir" or medium,
                    str(size) if size and medium else None,
                )
            )
        labels = self.rt.labels(self.uid, self.ns, self.name, "volume")
        for plan in self.volumes:
            if plan.kind == "persistentVolumeClaim":  # the claim's own, outliving the pod
                claim_labels = self.rt.claim_labels(self.ns)
                await self.rt.call(self.uid, self.rt.create_volume, plan, claim_labels)
                continue
            await self.rt.call(self.uid, self.rt.create_volume, plan, labels)
        ports = {}
        for container in spec["containers"]:
            for port in container.get("ports") or []:
                if port.get("hostPort"):
                    key = f"{port['containerPort']}/{port.get('protocol', 'TCP').lower()}"
                    ports[key] = (port.get("hostIP") or "0.0.0.0", port["hostPort"])
        delay = 0.5
        while True:
            try:
                self.sandbox = await self.rt.call(
                    self.uid,
                    self.rt.run_sandbox,
                    f"k8s_POD_{self.name}_{self.ns}_{self.uid}_0",
                    (spec.get("hostname") or self.name)[:63],
                    self.rt.labels(self.uid, self.ns, self.name, "pause"),
                    self.volumes,
                    bool(spec.get("hostNetwork")),
                    fs_group,
                    ports,
                )
                break
            except docker.errors.DockerException as exc:
                self.event(
                    "FailedCreatePodSandBox", f"Failed to create pod sandbox: {exc}", "Warning"
                )
                await self.rt.call(self.uid, self.rt.remove_role, self.uid, "pause")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
        for vol in spec.get("volumes") or []:
            if "secret" in vol or "configMap" in vol:
                kind = "secrets" if "secret" in vol else "configmaps"
                name = vol["secret"]["secretName"] if "secret" in vol else vol["configMap"]["name"]
                source = self.cluster.store.get(kind, self.ns, name)
                archive = podspec.volume_archive(vol, source, fs_group)
                await self.rt.call(
                    self.uid,
                    self.rt.put_files,
                    self.sandbox.id,
                    f"/.k8s-double/volumes/{vol['name']}",
                    archive,
                )
        self.publish()

    def _claim_plan(self, vol: JSON) -> VolumePlan:
        """A claim's volume: one docker volume per claim object (its uid), shared by
        every pod that mounts the claim and kept when they go (removed with the double)."""
        claim = self.cluster.store.get(
            "persistentvolumeclaims", self.ns, vol["persistentVolumeClaim"]["claimName"]
        )
        assert claim is not None  # _mount_problem waited for it
        uid = claim["metadata"]["uid"]
        return VolumePlan(vol["name"], f"k8s-double-claim-{uid}", "persistentVolumeClaim", False)

    def _mount_problem(self, spec: JSON, fs_group: int | None) -> str | None:
        for vol in spec.get("volumes") or []:
            failed = f'MountVolume.SetUp failed for volume "{vol["name"]}" :'
            if not any(k in vol for k in podspec.SUPPORTED_VOLUMES):
                kind = next((k for k in vol if k != "name"), "unknown")
                return f"{failed} volume type {kind} is not supported by the k8s double"
            if "persistentVolumeClaim" in vol:
                name = vol["persistentVolumeClaim"].get("claimName", "")
                if self.cluster.store.get("persistentvolumeclaims", self.ns, name) is None:
                    return f'persistentvolumeclaim "{name}" not found'
                continue
            if "secret" in vol or "configMap" in vol:
                kind = "secret" if "secret" in vol else "configmap"
                src = vol.get("secret") or vol.get("configMap") or {}
                name = src.get("secretName") or src.get("name")
                obj = self.cluster.store.get(f"{kind}s", self.ns, name)
                if obj is None and not src.get("optional"):
                    return f'{failed} {kind} "{name}" not found'
                try:
                    podspec.volume_archive(vol, obj, fs_group)
                except ConfigError as exc:
                    return f"{failed} {exc}"
        return None

    # -- containers ----------------------------------------------------------------------
    async def _run_init_containers(self) -> bool:
        for rec in [r for r in self.records if r.init]:
            delay: float | None = None
            while True:
                state = await self._run_container(rec)
                if state.get("exitCode") == 0:
                    rec.ready = True
                    self.publish()
                    break
                if self.policy == "Never":
                    self.final_phase = "Failed"
                    self.publish()
                    await self._stop_sandbox()
                    return False
                delay = await self._back_off(rec, delay)
        self.init_done = True
        for rec in self.mains:
            rec.state = {"waiting": {"reason": "ContainerCreating"}}
        self.publish()
        return True

    async def _run_main_containers(self) -> None:
        supervisors = []
        for rec in self.mains:
            supervisors.append(asyncio.create_task(self._supervise(rec)))
            await rec.attempted.wait()
        try:
            await asyncio.gather(*supervisors)
        finally:
            for task in supervisors:
                task.cancel()
        if self.phase() in ("Succeeded", "Failed"):
            await self._stop_sandbox()

    async def _supervise(self, rec: ContainerRecord) -> None:
        delay: float | None = None
        while True:
            state = await self._run_container(rec)
            code = state.get("exitCode")
            if self.policy == "Never" or (self.policy == "OnFailure" and code == 0):
                self.publish()
                return
            delay = await self._back_off(rec, delay)

    async def _back_off(self, rec: ContainerRecord, delay: float | None) -> float:
        """Wait before restarting ``rec``: the first restart is immediate, then the delay
        doubles from the double's base up to its cap (CrashLoopBackOff meanwhile)."""
        base, cap = self.cluster.backoff
        if delay is None:
            return 0.0
        delay = base if delay == 0.0 else min(delay * 2, cap)
        pod_ref = f"{self.name}_{self.ns}({self.uid})"
        rec.last_state = (
            {"terminated": rec.state["terminated"]} if "terminated" in rec.state else rec.last_state
        )
        rec.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:g}s restarting failed "
                f"container={rec.name} pod={pod_ref}",
            }
        }
        self.publish()
        self.event(
            "BackOff",
            f"Back-off restarting failed container {rec.name} in pod {pod_ref}",
            "Warning",
            rec,
        )
        await asyncio.sleep(delay)
        return delay

    async def _ensure_image(self, rec: ContainerRecord) -> dict[str, Any]:
        image, policy = rec.spec["image"], rec.spec.get("imagePullPolicy", "IfNotPresent")
        delay = 0.0
        while True:
            found = await self.rt.call(self.uid, self.rt.image, image)
            if found is not None:
                rec.image_id = found[0]
                if policy == "Always":
                    self.event("Pulling", f'Pulling image "{image}"', rec=rec)
                    self.event(
                        "Pulled",
                        f'Successfully pulled image "{image}" in 1ms (1ms including waiting). '
                        f"Image size: {found[1]} bytes.",
                        rec=rec,
                    )
                else:
                    self.event(
                        "Pulled", f'Container image "{image}" already present on machine', rec=rec
                    )
                return found[2]
            if policy == "Never":
                message = f'Container image "{image}" is not present with pull policy of Never'
                rec.state = {"waiting": {"reason": "ErrImageNeverPull", "message": message}}
                self.publish()
                rec.attempted.set()
                self.event("ErrImageNeverPull", message, "Warning", rec)
                await asyncio.sleep(max(delay, 1.0))
                delay = min(max(delay * 2, 1.0), self.cluster.backoff[1])
                continue
            ref = normalize_image(image)
            error = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
                f'failed to resolve reference "{ref}": {ref}: not found '
                "(the k8s double never pulls: the image is not present locally)"
            )
            self.event("Pulling", f'Pulling image "{image}"', rec=rec)
            self.event("Failed", f'Failed to pull image "{image}": {error}', "Warning", rec)
            self.event("Failed", "Error: ErrImagePull", "Warning", rec)
            rec.state = {"waiting": {"reason": "ErrImagePull", "message": error}}
            self.publish()
            rec.attempted.set()
            await asyncio.sleep(0.3)
            back = f'Back-off pulling image "{image}"'
            rec.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f"{back}: ErrImagePull: {error}",
                }
            }
            self.publish()
            self.event("BackOff", back, "Normal", rec)
            self.event("Failed", "Error: ImagePullBackOff", "Warning", rec)
            delay = min(max(delay * 2, self.cluster.backoff[0]), self.cluster.backoff[1])
            await asyncio.sleep(delay)

    async def _run_container(self, rec: ContainerRecord) -> JSON:
        """Create, start and wait for one run of ``rec``; return its terminated state."""
        try:
            image_config = await self._ensure_image(rec)
            cid = await self._create(rec, image_config)
            self.event("Created", f"Created container: {rec.name}", rec=rec)
            exit_waiter = self.rt.expect_exit(cid)
            try:
                await self.rt.call(self.uid, self.rt.start, cid)
            except docker.errors.APIError as exc:
                exit_waiter.cancel()
                message = f"failed to create containerd task: {exc.explanation or exc}"
                self.event("Failed", f"Error: {message}", "Warning", rec)
                now = rfc3339()
                terminated = {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": message,
                    "startedAt": "1970-01-01T00:00:00Z",
                    "finishedAt": now,
                    "containerID": f"docker://{cid}",
                }
                rec.state, rec.started, rec.ready = {"terminated": terminated}, False, False
                self.publish()
                return terminated
            docker_state = await self.rt.call(self.uid, self.rt.state, cid)
            rec.state = {
                "running": {
                    "startedAt": parse_docker_time(docker_state.get("StartedAt")) or rfc3339()
                }
            }
            rec.started, rec.ready = True, not rec.init
            self.event("Started", f"Started container {rec.name}", rec=rec)
            self.publish()
            rec.attempted.set()
            final = await exit_waiter
            terminated = await self._terminated(rec, cid, final)
            rec.state, rec.started, rec.ready = (
                {"terminated": terminated},
                False,
                rec.init and terminated["exitCode"] == 0,
            )
            self.publish()
            return terminated
        finally:
            rec.attempted.set()

    async def _create(self, rec: ContainerRecord, image_config: JSON) -> str:
        """docker create for ``rec``, retrying while its configuration cannot be built
        (CreateContainerConfigError) or docker refuses it (CreateContainerError)."""
        delay = 0.5
        while True:
            pod = self.pod()
            assert pod is not None and self.sandbox is not None
            try:
                kwargs = await self._docker_kwargs(pod, rec, image_config)
                cid = await self.rt.call(
                    self.uid, self.rt.create_container, rec.spec["image"], **kwargs
                )
                break
            except ConfigError as exc:
                reason, message = "CreateContainerConfigError", str(exc)
            except docker.errors.APIError as exc:
                reason, message = "CreateContainerError", str(exc.explanation or exc)
            rec.state = {"waiting": {"reason": reason, "message": message}}
            self.publish()
            rec.attempted.set()
            self.event("Failed", f"Error: {message}", "Warning", rec)
            await self.cluster.store.wait_change(("secrets", "configmaps"), self.ns, delay)
            delay = min(delay * 2, 8.0)
        if rec.prev_docker_id:
            await self.rt.call(self.uid, self.rt.remove_container, rec.prev_docker_id)
        if rec.docker_id:
            if "terminated" in rec.state:
                rec.last_state = {"terminated": rec.state["terminated"]}
            rec.prev_docker_id = rec.docker_id
            rec.restart_count += 1
        rec.attempt += 1
        rec.docker_id = cid
        return cid

    async def _docker_kwargs(self, pod: JSON, rec: ContainerRecord, image_config: JSON) -> JSON:
        spec, container, sandbox = pod["spec"], rec.spec, self.sandbox
        assert sandbox is not None

        def lookup(kind: str, name: str) -> JSON | None:
            return self.cluster.store.get(kind, self.ns, name)

        env = podspec.build_env(pod, container, lookup)
        env.setdefault("HOSTNAME", (spec.get("hostname") or self.name)[:63])
        user, groups = podspec.effective_user(pod, container, str(image_config.get("User") or ""))
        mounts = []
        plans = {p.name: p for p in self.volumes}
        for mount in container.get("volumeMounts") or []:
            plan = plans[mount["name"]]
            read_only = bool(mount.get("readOnly")) or plan.kind in ("secret", "configMap")
            if mount.get("subPath"):
                base = await self.rt.call(self.uid, self.rt.volume_path, plan.docker_name)
                source = os.path.join(base, mount["subPath"])
                writable = plan.kind in ("emptyDir", "persistentVolumeClaim")
                if writable and not os.path.exists(source):
                    os.makedirs(source, mode=0o777, exist_ok=True)
                mounts.append(Mount(mount["mountPath"], source, type="bind", read_only=read_only))
            else:
                # a claim's volume is never filled from the image (docker's copy-up would
                # give it the image directory's owner and mode)
                no_copy = plan.kind == "persistentVolumeClaim"
                mounts.append(
                    Mount(
                        mount["mountPath"],
                        plan.docker_name,
                        type="volume",
                        read_only=read_only,
                        no_copy=no_copy,
                    )
                )
        self.term_dir.mkdir(parents=True, exist_ok=True)
        term_file = self.term_dir / f"{rec.name}-{rec.attempt + 1}"
        term_file.unlink(missing_ok=True)
        term_file.write_bytes(b"")
        term_file.chmod(0o666)
        mounts.append(Mount(container["terminationMessagePath"], str(term_file), type="bind"))
        kwargs: JSON = {
            "name": f"k8s_{rec.name}_{self.name}_{self.ns}_{self.uid}_{rec.attempt + 1}",
            "environment": env,
            "labels": self.rt.labels(
                self.uid, self.ns, self.name, "init" if rec.init else "main", rec.name
            ),
            "mounts": mounts,
            "network_mode": "host" if sandbox.host_network else f"container:{sandbox.id}",
            "ipc_mode": f"container:{sandbox.id}",
            "tty": bool(container.get("tty")),
            "stdin_open": bool(container.get("stdin")),
            **podspec.docker_limits(container),
            **podspec.security_options(container),
        }
        if container.get("command"):
            kwargs["entrypoint"] = [podspec.expand(str(a), env) for a in container["command"]]
        if container.get("args"):
            kwargs["command"] = [podspec.expand(str(a), env) for a in container["args"]]
        elif container.get("command"):
            kwargs["command"] = []
        if container.get("workingDir"):
            kwargs["working_dir"] = container["workingDir"]
        if user:
            kwargs["user"] = user
        if groups:
            kwargs["group_add"] = groups
        if spec.get("shareProcessNamespace"):
            kwargs["pid_mode"] = f"container:{sandbox.id}"
        return kwargs

    async def _terminated(self, rec: ContainerRecord, cid: str, state: JSON) -> JSON:
        code = int(state.get("ExitCode") or 0)
        reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        terminated: JSON = {
            "exitCode": code,
            "reason": reason,
            "startedAt": parse_docker_time(state.get("StartedAt")) or rfc3339(),
            "finishedAt": parse_docker_time(state.get("FinishedAt")) or rfc3339(),
            "containerID": f"docker://{cid}",
        }
        if code > 128:
            terminated["signal"] = code - 128
        term_file = self.term_dir / f"{rec.name}-{rec.attempt}"
        message = (
            term_file.read_bytes()[:4096].decode(errors="replace") if term_file.exists() else ""
        )
        if (
            not message
            and code != 0
            and rec.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            raw = await self.rt.call(self.uid, self.rt.logs, cid, tail=80)
            message = raw[-2048:].decode(errors="replace")
        if message:
            terminated["message"] = message
        return terminated

    # -- stopping ------------------------------------------------------------------------
    async def _stop_sandbox(self) -> None:
        if self.sandbox is not None:
            await self.rt.call(self.uid, self.rt.kill, self.sandbox.id)
        self.publish()

    async def terminate(self, grace: int, reason: tuple[str, str] | None = None) -> None:
        """Stop the pod's containers with ``grace`` seconds (SIGTERM, then SIGKILL) and
        publish the terminal status; the object itself stays."""
        self.terminating = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.rt.settle(self.uid)
        running = []
        for rec in self.records:  # docker knows best: a start may have raced the delete
            if rec.docker_id:
                with contextlib.suppress(docker.errors.DockerException):
                    if (await self.rt.call(self.uid, self.rt.state, rec.docker_id)).get("Running"):
                        running.append(rec)
        for rec in running:
            self.event("Killing", f"Stopping container {rec.name}", rec=rec)
        await asyncio.gather(
            *(self.rt.call(self.uid, self.rt.stop, r.docker_id, grace) for r in running)
        )
        for rec in running:
            assert rec.docker_id is not None
            with contextlib.suppress(docker.errors.DockerException):
                state = await self.rt.call(self.uid, self.rt.state, rec.docker_id)
                rec.state = {"terminated": await self._terminated(rec, rec.docker_id, state)}
            rec.ready = rec.started = False
        if self.final_phase is None:
            exits = [r.state.get("terminated", {}).get("exitCode") for r in self.mains]
            self.final_phase = "Succeeded" if exits and all(c == 0 for c in exits) else "Failed"
        self.final_reason = reason or self.final_reason
        await self._stop_sandbox()

    async def hasten(self, grace: int) -> None:
        """A delete with a shorter grace period arrived: kill what still runs after it."""
        await asyncio.sleep(grace)
        for rec in self.records:
            if rec.docker_id:
                await self.rt.call(self.uid, self.rt.kill, rec.docker_id)

    async def cleanup(self) -> None:
        """Remove every docker object and host file of the pod."""
        await self.rt.settle(self.uid)
        await self.rt.call(None, self.rt.remove_pod, self.uid)
        shutil.rmtree(self.term_dir, ignore_errors=True)

    def container(self, name: str) -> ContainerRecord | None:
        return next((r for r in self.records if r.name == name), None)

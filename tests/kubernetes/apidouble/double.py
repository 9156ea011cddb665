"""K8sDouble: the Kubernetes API double, served by aiohttp on 127.0.0.1 from its own
event loop in a background thread, so tests on any other loop can use it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as _dt
import ipaddress
import secrets
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from .cluster import ApiRequest, Cluster, DenyRule, namespace_object
from .runtime import LABEL, LABEL_NAMESPACE, LABEL_POD
from .server import Api

T = TypeVar("T")
DEFAULT_NAMESPACE = "cluster-provisioners-test"
NODE_NAME = "double-node-1"


class Denial:
    """A deny rule in force; usable as a context manager that lifts it on exit."""

    def __init__(self, double: K8sDouble, rule: DenyRule) -> None:
        self._double = double
        self.rule = rule

    def lift(self) -> None:
        with self._double._lock:
            if self.rule in self._double.cluster.deny:
                self._double.cluster.deny.remove(self.rule)

    def __enter__(self) -> Denial:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lift()


class K8sDouble:
    """An in-process Kubernetes API server whose pods are docker containers.

    ``start()`` serves it and writes ``kubeconfig_path`` (server URL, CA, bearer token,
    context namespace ``namespace``); ``stop()`` removes every container and volume."""

    def __init__(
        self,
        *,
        helper_image: str,
        namespace: str = DEFAULT_NAMESPACE,
        workdir: Path | None = None,
        tls: bool = True,
        node_labels: dict[str, str] | None = None,
        node_resources: dict[str, str] | None = None,
        backoff: tuple[float, float] = (1.0, 4.0),
        user: str | None = None,
        removal_delay: float = 1.0,
        stuck_pull_removal: float = 12.0,
    ) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        self.namespace = namespace
        self.helper_image = helper_image
        self.tls = tls
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="k8s-double-"))
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self.token = secrets.token_urlsafe(32)
        self.user = user or f"system:serviceaccount:{namespace}:kernel-provisioner"
        self.node_name = NODE_NAME
        self.server_url = ""
        self.cluster = Cluster(
            self.instance_id,
            helper_image,
            self.workdir,
            self.user,
            NODE_NAME,
            dict(node_labels or {}),
            dict(node_resources or {}),
            backoff,
        )
        self.cluster.removal_delay = removal_delay
        self.cluster.stuck_pull_removal = stuck_pull_removal
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ca_pem = b""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> K8sDouble:
        """Serve in a background thread; returns once the kubeconfig is written."""
        ready: threading.Event = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(
            target=main, name=f"k8s-double-{self.instance_id}", daemon=True
        )
        self._thread.start()
        ready.wait(60)
        if failure:
            raise RuntimeError(f"the k8s double did not start: {failure[0]}") from failure[0]
        self._write_kubeconfig()
        return self

    async def _serve(self) -> None:
        await self.cluster.start()
        if self.namespace not in ("default",):
            self.cluster.store.create("namespaces", namespace_object(self.namespace))
        api = Api(self.cluster, self.token)
        self._runner = web.AppRunner(
            api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1
        )
        await self._runner.setup()
        context = self._tls_context() if self.tls else None
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api.server_address = f"127.0.0.1:{port}"
        self.server_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop serving and remove every docker object this double created."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self.call(self._shutdown(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.cluster.runtime.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._loop = None

    async def _shutdown(self) -> None:
        await self.cluster.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the double's loop and wait for its result (from any thread)."""
        assert self._loop is not None, "the double is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> K8sDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> str:
        """``kubeconfig_path`` as a string."""
        return str(self.kubeconfig_path)

    # -- test controls -----------------------------------------------------------------------
    def forbid(self, verb: str, resource: str, namespace: str | None = None) -> Denial:
        """Answer 403 Forbidden to ``verb`` on ``resource`` (e.g. "create", "pods" or
        "pods/exec"; "*" matches anything) until lifted (``allow_all`` or the returned
        object's ``lift``/context manager). Websocket exec/portforward need both the
        ``get`` and ``create`` verbs on the subresource, as on Kubernetes >= 1.31."""
        rule = DenyRule(verb, resource, namespace)
        with self._lock:
            self.cluster.deny.append(rule)
        return Denial(self, rule)

    def refuse(
        self,
        verb: str,
        resource: str,
        times: int = 1,
        code: int = 403,
        namespace: str | None = None,
    ) -> Denial:
        """Refuse the next ``times`` matching requests with ``code`` (403 Forbidden, or a
        5xx as a failing API server answers), then serve them again: a transient fault."""
        rule = DenyRule(verb, resource, namespace, times=times, code=code)
        with self._lock:
            self.cluster.deny.append(rule)
        return Denial(self, rule)

    def allow_all(self) -> None:
        """Lift every deny rule."""
        with self._lock:
            self.cluster.deny.clear()

    def leftovers(self, wait: float | None = None) -> list[str]:
        """Docker containers/volumes still present for pods no longer in the API, after
        waiting up to ``wait`` seconds (default: 15 s more than a pod stuck in an image
        pull takes to go) for pending teardowns (e.g. ``["container k8s_..."]``)."""
        if wait is None:
            wait = self.cluster.stuck_pull_removal + 15.0

        async def check() -> list[str]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while loop.time() < deadline:
                busy = [t for t in self.cluster.tasks if not t.done()]
                live = self._live_uids()
                stale = [w for uid, w in self.cluster.workers.items() if uid not in live]
                if not busy and not stale:
                    break
                await asyncio.sleep(0.1)
            live = self._live_uids()
            rt = self.cluster.runtime
            return await rt.call(None, rt.leftovers, live)

        return self.call(check(), timeout=wait + 60)

    def _live_uids(self) -> set[str]:
        return {p["metadata"]["uid"] for p in self.cluster.store.list("pods")}

    def compact(self) -> None:
        """Drop the watch history like an etcd compaction: resuming a watch from an older
        resourceVersion then yields a 410 Expired ERROR event."""
        self.call(_run(self.cluster.store.compact))

    def set_node(
        self, labels: dict[str, str] | None = None, resources: dict[str, str] | None = None
    ) -> None:
        """Change the fake node's extra labels and extended resources (e.g.
        ``{"nvidia.com/gpu": "1"}``); pending pods are scheduled again."""
        self.call(_run(lambda: self.cluster.update_node(labels, resources)))

    @property
    def requests(self) -> list[ApiRequest]:
        """Every API request served so far: verb, resource, namespace, name, status code."""
        return list(self.cluster.requests)

    @property
    def authorizations(self) -> list[tuple[str, str, str | None]]:
        """Every authorization check so far, as (verb, resource, namespace): what a Role
        must grant for the requests served (a websocket exec counts get and create)."""
        return list(self.cluster.authorizations)

    def docker_containers(self, pod: str, namespace: str | None = None) -> list[str]:
        """Names of the docker containers currently backing ``pod`` (for debugging)."""
        rt = self.cluster.runtime
        labels = [
            f"{LABEL}={self.instance_id}",
            f"{LABEL_POD}={pod}",
            f"{LABEL_NAMESPACE}={namespace or self.namespace}",
        ]
        return [c.name for c in rt.client.containers.list(all=True, filters={"label": labels})]

    # -- TLS and kubeconfig -------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = _dt.datetime.now(_dt.timezone.utc)

        def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(minutes=5))
                .not_valid_after(now + _dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            if not ca:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(
                        [
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                            x509.DNSName("localhost"),
                        ]
                    ),
                    critical=False,
                )
            return builder.sign(signer, hashes.SHA256())

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = cert("k8s-double-ca", ca_key, "k8s-double-ca", ca_key, True)
        key = ec.generate_private_key(ec.SECP256R1())
        server_cert = cert("kube-apiserver", key, "k8s-double-ca", ca_key, False)
        pem = serialization.Encoding.PEM
        self._ca_pem = ca_cert.public_bytes(pem)
        (self.workdir / "ca.crt").write_bytes(self._ca_pem)
        (self.workdir / "apiserver.crt").write_bytes(server_cert.public_bytes(pem))
        key_path = self.workdir / "apiserver.key"
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_path.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.workdir / "apiserver.crt", key_path)
        return context

    def _write_kubeconfig(self) -> None:
        cluster: dict[str, Any] = {"server": self.server_url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self._ca_pem).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-double", "cluster": cluster}],
            "users": [{"name": "k8s-double-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "k8s-double",
                    "context": {
                        "cluster": "k8s-double",
                        "user": "k8s-double-user",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "k8s-double",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))
        self.kubeconfig_path.chmod(0o600)


async def _run(fn: Any) -> Any:
    return fn()

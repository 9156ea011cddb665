"""The port-forward carries every client connection of a kernel over one SPDY/3.1
connection per pod (issue 23), against the ``kube`` API: the double, or a real cluster.

Real kernels answer execute requests through it while clients open, close and reopen
their ZMQ connections; a restart moves it to the new pod; a dropped connection is
replaced at the next client connection; a stop leaves nothing open. On the double the
server side counts too (connections per pod, protocol violations, the PING echo), and
an API server that refuses the upgrade makes the port-forward use websockets.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from provisioners.k8s import portforward, spdy
from provisioners.k8s.client import Forbidden, KubeApiError, KubeClient, NotFound
from provisioners.k8s.portforward import PortForwarder
from tests.helpers import KUBERNETES_PROVISIONER, Kube, execute
from tests.helpers.kube import no_leftovers, pod_of

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

MakeKM = Callable[..., AsyncKernelManager]


@pytest.fixture
def spdy_stats(kube: Kube, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The double's SPDY counters (None on a real cluster); no protocol violation after."""
    if kube.forbid is None:
        yield None
        return
    from tests.kubernetes.apidouble import spdyserver

    double = request.getfixturevalue("kube_double")
    stats = spdyserver.stats(double.cluster)
    seen = len(stats.violations)
    yield stats
    assert stats.violations[seen:] == [], "the client broke the SPDY protocol"


def forwarder_of(km: AsyncKernelManager) -> PortForwarder:
    forwarder = pod_of(km)._forwarder
    assert forwarder is not None, "no port-forward"
    return forwarder


async def start(kube: Kube, kernel_manager: MakeKM, **config: Any) -> AsyncKernelManager:
    km = kernel_manager(
        KUBERNETES_PROVISIONER, kube.config(connection_mode="port-forward", **config), **kube.spec()
    )
    await km.start_kernel()
    return km


def client(km: AsyncKernelManager) -> AsyncKernelClient:
    """A client of ``km``'s kernel with a session of its own (clients sharing the
    manager's session share a ZMQ identity: the kernel's replies go to one of them)."""
    session = Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
    return km.client(session=session)


async def run(kc: AsyncKernelClient, code: str) -> str:
    """stdout of ``code`` run through ``kc`` (channels already started, kept open)."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    await kc.wait_for_ready(timeout=60)
    reply = await kc.execute_interactive(code, output_hook=hook, timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


async def test_one_connection_per_pod_carries_every_client_connection(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, spdy_stats: Any
) -> None:
    km = await start(kube, kernel_manager)
    forwarder = forwarder_of(km)
    pod = pod_of(km).pod_name
    assert forwarder.transport == "spdy"
    # three clients at once (15 local connections), each executing through the forward
    clients = [client(km) for _ in range(3)]
    for kc in clients:
        kc.start_channels()
    try:
        outs = await asyncio.gather(*(run(kc, f"print({i} * 7)") for i, kc in enumerate(clients)))
        assert outs == ["0\n", "7\n", "14\n"]
        assert forwarder.active_connections >= 15
        # one closes; another one opens; the rest keep working
        clients[0].stop_channels()
        late = client(km)
        late.start_channels()
        clients[0] = late
        assert await run(late, "print('late')") == "late\n"
        assert await run(clients[1], "print('still')") == "still\n"
    finally:
        for kc in clients:
            kc.stop_channels()
    assert forwarder.connections_opened == 1, "more than one connection to the API server"
    if spdy_stats is not None:
        assert spdy_stats.opened.get(pod) == 1
        assert spdy_stats.open_connections(pod) == 1
        assert spdy_stats.pings_echoed >= 1, "the server's PING was not echoed"
        assert spdy_stats.pairs >= 16
        # the closed clients' streams are gone on the server's side too (the manager's
        # own control connection stays)
        for _ in range(50):
            if spdy_stats.open_streams() <= 2:
                break
            await asyncio.sleep(0.1)
        assert spdy_stats.open_streams() <= 2

    await km.shutdown_kernel()
    assert pod_of(km)._forwarder is None
    if spdy_stats is not None:
        assert spdy_stats.open_connections(pod) == 0, "a connection outlived the stop"
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_a_client_that_reconnects_gets_through(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, spdy_stats: Any
) -> None:
    km = await start(kube, kernel_manager)
    kc = client(km)
    kc.start_channels()
    try:
        assert await run(kc, "x = 41; print(x + 1)") == "42\n"
        # ZMQ's own reconnect: the local connections end, the sockets connect again
        kc.stop_channels()
        kc = client(km)
        kc.start_channels()
        assert await run(kc, "print(x)") == "41\n"
    finally:
        kc.stop_channels()
    assert forwarder_of(km).connections_opened == 1
    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_a_restart_moves_the_connection_to_the_new_pod(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, spdy_stats: Any
) -> None:
    km = await start(kube, kernel_manager)
    kc = client(km)
    kc.start_channels()
    try:
        assert await run(kc, "print('one')") == "one\n"
        first = pod_of(km).pod_name
        await km.restart_kernel()
        second = pod_of(km).pod_name
        assert second != first
        assert await run(kc, "print('two')") == "two\n"
    finally:
        kc.stop_channels()
    if spdy_stats is not None:
        assert spdy_stats.open_connections(first) == 0, "the old pod's connection stayed"
        assert spdy_stats.open_connections(second) == 1
    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_a_dropped_connection_is_replaced_at_the_next_client_connection(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    spdy_stats: Any,
    request: pytest.FixtureRequest,
) -> None:
    km = await start(kube, kernel_manager)
    forwarder = forwarder_of(km)
    kc = client(km)
    kc.start_channels()
    try:
        assert await run(kc, "print('before')") == "before\n"
        if spdy_stats is not None:  # the API server goes away, as the client sees it
            from tests.kubernetes.apidouble import spdyserver

            double = request.getfixturevalue("kube_double")
            cut = double.call(_on_loop(spdyserver.drop_all, double.cluster))
            assert cut >= 1
        else:  # the TCP connection dies under the client

            async def kill() -> None:
                assert forwarder._session is not None
                assert forwarder._session.transport is not None
                forwarder._session.transport.abort()

            await pod_of(km)._on_engine(kill())
        # ZMQ notices its connections ended and reconnects through the same listeners
        assert await run(kc, "print('after')") == "after\n"
    finally:
        kc.stop_channels()
    assert forwarder.connections_opened == 2
    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def test_an_api_server_refusing_the_upgrade_gets_websockets(
    kube: Kube,
    kube_api: KubeClient,
    kernel_manager: MakeKM,
    spdy_stats: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if spdy_stats is None:
        pytest.skip("needs an API server that refuses the SPDY upgrade (the API double)")
    caplog.set_level(logging.WARNING)
    server = ""
    spdy_stats.refuse_upgrade = True
    websockets = spdy_stats.websockets
    try:
        kms = [await start(kube, kernel_manager) for _ in range(2)]
        server = forwarder_of(kms[0])._server
        for km in kms:
            assert forwarder_of(km).transport == "websocket"
            assert (await execute(km, "print('via websockets')"))["stdout"] == "via websockets\n"
        assert spdy_stats.websockets > websockets
        said = [r for r in caplog.records if "refused the SPDY/3.1" in r.getMessage()]
        assert len(said) == 1, "the fallback is to be logged once"
        for km in kms:
            await km.shutdown_kernel()
            await no_leftovers(kube_api, kube.namespace, km.kernel_id)
    finally:
        spdy_stats.refuse_upgrade = False
        portforward._NO_SPDY.discard(server)


async def test_the_websocket_protocol_setting(
    kube: Kube, kube_api: KubeClient, kernel_manager: MakeKM, spdy_stats: Any
) -> None:
    km = await start(kube, kernel_manager, port_forward_protocol="websocket")
    assert forwarder_of(km).transport == "websocket"
    assert (await execute(km, "print('ws')"))["stdout"] == "ws\n"
    assert forwarder_of(km).connections_opened == 0
    await km.shutdown_kernel()
    await no_leftovers(kube_api, kube.namespace, km.kernel_id)


async def _on_loop(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def test_an_http_proxy_means_websockets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    cfg = SimpleNamespace(proxy=None, host="https://k8s-behind-a-proxy.invalid:6443")
    client: Any = SimpleNamespace(api=SimpleNamespace(configuration=cfg))
    try:
        assert PortForwarder(client, "ns", "pod", [1, 2]).transport == "websocket"
        monkeypatch.setenv("NO_PROXY", "k8s-behind-a-proxy.invalid")
        assert spdy.proxied(client) is False
    finally:
        portforward._NO_SPDY.discard(cfg.host)


def test_spdy_header_blocks_have_no_dictionary_and_lowercase_names() -> None:
    encoder = spdy.HeaderEncoder()
    first = encoder.encode({"streamType": "error", "port": "5555", "requestID": "1"})
    second = encoder.encode({"streamType": "data", "port": "5555", "requestID": "1"})
    assert not first[1] & 0x20, "FDICT set: a reader needs SPDY's dictionary"
    inflate = zlib.decompressobj()
    blocks = [inflate.decompress(first), inflate.decompress(second)]
    for block, kind in zip(blocks, ("error", "data"), strict=True):
        (count,) = struct.unpack_from(">I", block)
        assert count == 3
        assert b"streamtype" in block and kind.encode() in block and b"requestid" in block
        assert b"streamType" not in block


def test_answers_other_than_the_upgrade() -> None:
    assert isinstance(spdy._refusal(403, '{"message": "no"}'), Forbidden)
    assert isinstance(spdy._refusal(404, ""), NotFound)
    refused = spdy._refusal(400, '{"kind": "Status", "message": "Upgrade request required"}')
    assert isinstance(refused, spdy.SpdyRefused) and refused.status == 400
    assert "Upgrade request required" in str(refused)
    unanswered = spdy._refusal(0, "")
    assert isinstance(unanswered, KubeApiError) and unanswered.reason == "Unreachable"

"""Prometheus metrics: kernel starts, live kernels, warm pools, engine API errors, adoptions.

The metrics live in prometheus_client's default registry, which Jupyter Server serves at
its own ``/metrics`` (with its token while ``ServerApp.authenticate_prometheus`` is on,
the default). Every name starts with ``cluster_provisioners_``. Labels other than
``target`` and ``kernelspec`` take values from small fixed sets (:data:`OUTCOMES`,
:data:`MISS_REASONS`, :data:`ERROR_KINDS`), so a server's series stay few.

Who records what:

- the lifecycle (:mod:`provisioners.lifecycle.base`): :func:`start_begun` and
  :func:`start_ended` around a start (first starts only in the latency histogram; a
  restart's engine errors count too), :func:`start_refused` for a kernelspec config
  refused before the start, :func:`kernel_gone` at a kernel's final cleanup;
- the pools: :func:`record_claim`, :func:`record_miss` (:mod:`provisioners.pool.claim`)
  and :func:`set_pool_source` (:mod:`provisioners.pool.pools`);
- the Kubernetes API client: :func:`record_engine_error` for every failed request;
- adoption of a kernel left by an earlier server: the lifecycle's calls count it as live
  (``start_begun(adopting=True)``: not timed as a start); the adopter records its outcome
  with :func:`record_adoption`. :func:`track_live` counts a kernel attached otherwise.

Nothing here raises into its caller: a metric must never fail a kernel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .exceptions import (
    EngineUnavailableError,
    ForwardingRefusedError,
    HostKeyError,
    PortsExhaustedError,
    ProvisionerConfigError,
    SSHAuthenticationError,
    TransportEncryptionError,
)

if TYPE_CHECKING:
    from .lifecycle.base import ClusterProvisioner

log = logging.getLogger(__name__)

PREFIX = "cluster_provisioners_"

#: ``outcome`` of a start: ``ok`` or why it failed (see :func:`failure_reason`).
OUTCOMES = (
    "ok",
    "image",
    "scheduling",
    "forbidden",
    "timeout",
    "engine_down",
    "config",
    "other",
)
#: ``reason`` of a pool miss (a start of a pooled kernelspec that was cold).
MISS_REASONS = (
    "request_env",  # the request sets variables a warm kernel was started without
    "per_user",  # the kernelspec's settings vary by user ({username})
    "parameters",  # the request's launch parameters differ from the defaults
    "cwd",  # the request's working directory is not the warm kernels' one
    "arguments",  # the request passes extra arguments to the kernel's command
    "transport",  # the request asks for another transport than tcp
    "encryption",  # the request asks for CurveZMQ and the warm kernels have none
    "address",  # the warm kernels listen on another address
    "empty",  # no warm kernel was ready
    "claim_failed",  # claiming the warm kernel failed; it was removed
)
#: ``kind`` of an engine API error.
ERROR_KINDS = (
    "unreachable",
    "timeout",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "gone",
    "throttled",
    "server_error",
    "refused",
    "other",
)
#: Start latency buckets (seconds): a claim takes milliseconds, a pod with a pull minutes.
START_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

START_SECONDS = Histogram(
    f"{PREFIX}kernel_start_seconds",
    "Seconds from the start of a kernel's launch (pre_launch) until its channels are "
    "reachable or the start fails; first starts only, not restarts. outcome is 'ok' or "
    "why it failed: image, scheduling, forbidden, timeout, engine_down, config, other. "
    "pooled is 'pooled' for a claimed warm kernel, else 'cold'.",
    ["target", "kernelspec", "outcome", "pooled"],
    buckets=START_BUCKETS,
)
POOL_CLAIMS = Counter(
    f"{PREFIX}pool_claims",
    "Starts served by a warm kernel of the kernelspec's pool.",
    ["kernelspec"],
)
POOL_MISSES = Counter(
    f"{PREFIX}pool_misses",
    "Starts of a kernelspec with a pool that were cold, by reason: request_env, cwd, "
    "arguments, transport, encryption, address, empty (no warm kernel ready), "
    "claim_failed.",
    ["kernelspec", "reason"],
)
ENGINE_ERRORS = Counter(
    f"{PREFIX}engine_errors",
    "Engine API errors by target and kind (unreachable, timeout, unauthorized, forbidden, "
    "not_found, conflict, gone, throttled, server_error, refused, other). Kubernetes: "
    "every API request that failed (not_found and gone are often routine: a pod already "
    "deleted, an expired watch). Docker and SSH: the engine errors that failed a start "
    "(a warm kernel's too) or a restart, or sent a start to the local fallback.",
    ["target", "kind"],
)
ADOPTIONS = Counter(
    f"{PREFIX}adoptions",
    "Kernels left running by an earlier server that this server tried to adopt, by target "
    "and outcome.",
    ["target", "outcome"],
)


# ---------------------------------------------------------------------- starts


class _Starts:
    """Starts in progress (their clock) and the provisioners whose kernel may be live."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.begun: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()
        #: Targets that ever had a live kernel: shown at 0 once their kernels are gone.
        self.targets: set[str] = set()

    def live_provisioners(self) -> tuple[list[Any], set[str]]:
        with self.lock:
            return list(self.live), set(self.targets)


_STARTS = _Starts()


def start_begun(provisioner: ClusterProvisioner, *, restart: bool, adopting: bool = False) -> None:
    """A launch begins (``pre_launch``); a first start of a kernel (not a restart, not an
    adoption, not a warm kernel filling a pool) is timed for the latency histogram. An
    adoption that succeeds counts the kernel as live (its outcome: :func:`record_adoption`)."""
    if restart or adopting or provisioner.pool_id:
        return
    with _STARTS.lock:
        _STARTS.begun[provisioner] = time.monotonic()


def start_ended(provisioner: ClusterProvisioner, error: BaseException | None = None) -> None:
    """A launch ended: its kernel is reachable (``error`` None) or the launch failed."""
    try:
        _start_ended(provisioner, error)
    except Exception as exc:  # pragma: no cover - a metric never fails a start
        log.debug("Recording a start's metrics failed: %r", exc)


def _start_ended(provisioner: ClusterProvisioner, error: BaseException | None) -> None:
    engine = provisioner.engine
    if error is not None:  # Kubernetes: its client counts each failed request
        kind = engine_error_kind(error)
        if kind and engine.target not in ("kubernetes", "local"):
            ENGINE_ERRORS.labels(engine.target, kind).inc()
    if provisioner.pool_id:
        return  # a warm kernel filling its pool: the pool gauges show it
    with _STARTS.lock:
        begun = _STARTS.begun.pop(provisioner, None)
        if error is None:
            _STARTS.live.add(provisioner)
            _STARTS.targets.add(engine.target)
    if begun is None:
        return  # a restart or an adoption
    if error is None and engine.fallback_for not in ("", "kubernetes"):
        ENGINE_ERRORS.labels(engine.fallback_for, "unreachable").inc()  # it fell back
    outcome = "ok" if error is None else failure_reason(error)
    pooled = "pooled" if error is None and engine.claimed_from else "cold"
    START_SECONDS.labels(provisioner.target, provisioner.spec_name, outcome, pooled).observe(
        time.monotonic() - begun
    )


def start_refused(error: ProvisionerConfigError, kwargs: dict[str, Any]) -> None:
    """A kernelspec's config was refused as the provisioner was made (``kwargs``, its
    factory's arguments): when a kernel manager was starting that kernel, a failed start
    that took no time (``config``); not when a provisioner was made for another purpose
    (an adoption's look for kernels, the command line)."""
    kernel_id = kwargs.get("kernel_id")
    if not kernel_id or getattr(kwargs.get("parent"), "kernel_id", None) != kernel_id:
        return
    START_SECONDS.labels(
        error.target or "unknown", error.kernel_spec or "", "config", "cold"
    ).observe(0.0)


def kernel_gone(provisioner: ClusterProvisioner, *, restart: bool = False) -> None:
    """The kernel's cleanup ran: after a final one (not a restart's) it no longer counts
    as live."""
    if restart:
        return
    with _STARTS.lock:
        _STARTS.live.discard(provisioner)


def track_live(provisioner: ClusterProvisioner) -> None:
    """Count ``provisioner``'s kernel as live (an adopted kernel; a start does this
    itself). It stops counting once its kernel is cleaned up or stopped."""
    with _STARTS.lock:
        _STARTS.live.add(provisioner)
        _STARTS.targets.add(provisioner.engine.target)


def failure_reason(error: BaseException) -> str:
    """Why a start failed, as one of :data:`OUTCOMES` (never ``ok``).

    The error's class, or that of an error it was raised from, decides first; then its
    text (the engines' own words: an image pull, an unschedulable pod); else ``other``.
    """
    for exc in _chain(error):
        if isinstance(exc, ProvisionerConfigError | TransportEncryptionError | HostKeyError):
            return "config"
        if isinstance(exc, EngineUnavailableError) or getattr(exc, "unreachable", False) is True:
            return "engine_down"
        if isinstance(exc, PortsExhaustedError):
            return "scheduling"
        if isinstance(exc, SSHAuthenticationError | ForwardingRefusedError):
            return "forbidden"
        if _status(exc) in (401, 403):
            return "forbidden"
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            return "timeout"
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            return "config"  # the kernelspec's command does not exist
    text = str(error)
    if any(word in text for word in _IMAGE_WORDS):
        return "image"
    if "Unschedulable" in text:
        return "scheduling"
    if "Forbidden" in text:
        return "forbidden"
    if "launch_timeout=" in text:
        return "timeout"
    return "other"


#: Words of the engines' errors for an image that cannot be had.
_IMAGE_WORDS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "is not present on the Docker daemon",
    "cannot pull image",
)


def engine_error_kind(error: BaseException) -> str:
    """The :data:`ERROR_KINDS` kind of the engine error in ``error``'s chain, or '' when
    no engine API refused or failed (the kernel itself failed, a bad config...)."""
    for exc in _chain(error):
        if isinstance(exc, SSHAuthenticationError):
            return "unauthorized"
        if isinstance(exc, ForwardingRefusedError):
            return "forbidden"
        if isinstance(exc, EngineUnavailableError | ConnectionError):
            return "unreachable"
        status = _status(exc)
        if status is not None and type(exc).__module__.split(".")[0] == "docker":
            return http_error_kind(status)
        if type(exc).__module__.startswith("requests") and "Connection" in type(exc).__name__:
            return "unreachable"
    return ""


def http_error_kind(status: int, *, timed_out: bool = False) -> str:
    """The kind of an API answer with HTTP ``status`` (0: no answer; ``timed_out`` when
    none came in time)."""
    if status == 0:
        return "timeout" if timed_out else "unreachable"
    kinds = {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict"}
    kinds.update({410: "gone", 429: "throttled"})
    if status in kinds:
        return kinds[status]
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "refused"
    return "other"


def _status(exc: BaseException) -> int | None:
    """The HTTP status an API error carries (Kubernetes ``status``, Docker
    ``status_code``), or None."""
    for name in ("status", "status_code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# ---------------------------------------------------------------------- pools, errors


def record_claim(kernelspec: str) -> None:
    """A start was served by a warm kernel of ``kernelspec``'s pool."""
    POOL_CLAIMS.labels(kernelspec).inc()


def record_miss(kernelspec: str, reason: str) -> None:
    """A start of ``kernelspec`` (which has a pool) was cold; ``reason`` from
    :data:`MISS_REASONS`."""
    POOL_MISSES.labels(kernelspec, reason if reason in MISS_REASONS else "claim_failed").inc()


def record_engine_error(target: str, kind: str) -> None:
    """An engine API request of ``target`` failed; ``kind`` from :data:`ERROR_KINDS`."""
    ENGINE_ERRORS.labels(target, kind if kind in ERROR_KINDS else "other").inc()


def record_adoption(target: str, outcome: str) -> None:
    """This server tried to adopt a ``target`` kernel left by an earlier one; ``outcome``
    from the adoption's own small fixed set (e.g. adopted, failed)."""
    ADOPTIONS.labels(target, outcome).inc()


#: ``(kernelspec, ready, starting, size)`` of each open pool; set by the pools module.
PoolCounts = Callable[[], Iterable[tuple[str, int, int, int]]]


class _Gauges(Collector):
    """Gauges read when scraped: live kernels, and the warm pools' kernels."""

    def __init__(self) -> None:
        self.pool_source: PoolCounts | None = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            return self._families(self._live(), list(self._pools()))
        except Exception as exc:  # pragma: no cover - a scrape never fails on us
            log.debug("Collecting the live kernels and pools failed: %r", exc)
            return self._families()

    def _families(
        self,
        live: Tally[str] | None = None,
        pools: list[tuple[str, int, int, int]] | None = None,
    ) -> list[GaugeMetricFamily]:
        kernels = GaugeMetricFamily(
            f"{PREFIX}live_kernels",
            "Kernels this server runs, by the target they run on ('local' for a local "
            "fallback); a kernel counts from its start, claim or adoption until its final "
            "cleanup or stop, through its restarts. Warm kernels are not counted here.",
            labels=["target"],
        )
        for target, n in sorted((live or Tally()).items()):
            kernels.add_metric([target], n)
        warm = GaugeMetricFamily(
            f"{PREFIX}pool_kernels",
            "Warm kernels of each kernelspec's pool: ready (claimable) or starting.",
            labels=["kernelspec", "state"],
        )
        size = GaugeMetricFamily(
            f"{PREFIX}pool_size",
            "Warm kernels each kernelspec's pool keeps (its pool_size).",
            labels=["kernelspec"],
        )
        totals: dict[str, list[int]] = {}
        for spec, ready, starting, wanted in pools or []:
            total = totals.setdefault(spec, [0, 0, 0])
            total[0] += ready
            total[1] += starting
            total[2] += wanted
        for spec, (ready, starting, wanted) in sorted(totals.items()):
            warm.add_metric([spec, "ready"], ready)
            warm.add_metric([spec, "starting"], starting)
            size.add_metric([spec], wanted)
        return [kernels, warm, size]

    def _live(self) -> Tally[str]:
        provisioners, targets = _STARTS.live_provisioners()
        live: Tally[str] = Tally(dict.fromkeys(targets, 0))
        for provisioner in provisioners:
            if provisioner.has_process:
                live[provisioner.engine.target] += 1
        return live

    def _pools(self) -> Iterable[tuple[str, int, int, int]]:
        source = self.pool_source
        return source() if source is not None else ()


GAUGES = _Gauges()
REGISTRY.register(GAUGES)


def set_pool_source(source: PoolCounts) -> None:
    """Read the pools' counts from ``source`` when scraped (the pools module sets it)."""
    GAUGES.pool_source = source

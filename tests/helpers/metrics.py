"""Reading a real Jupyter Server's ``/metrics`` in tests: samples by name and labels."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.jupyter_server import JupyterServer, http

START = "cluster_provisioners_kernel_start_seconds_count"
SUM = "cluster_provisioners_kernel_start_seconds_sum"
LIVE = "cluster_provisioners_live_kernels"
ENGINE_ERRORS = "cluster_provisioners_engine_errors_total"

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def metrics_text(server: JupyterServer) -> str:
    """The server's ``/metrics`` (with its token)."""
    status, body = http("GET", f"{server.base}metrics", server.token, timeout=30)
    assert status == 200, body
    return body.decode()


def scrape(server: JupyterServer) -> Samples:
    """Every sample of the server's ``/metrics``."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text(server))
        for sample in family.samples
    }


def ours(samples: Samples, name: str) -> dict[Labels, float]:
    """The samples of metric ``name``, by their labels."""
    return {labels: value for (n, labels), value in samples.items() if n == name}


def labels(**values: str) -> Labels:
    return frozenset(values.items())


def start_labels(target: str, spec: str, outcome: str, pooled: str = "cold") -> Any:
    """The labels of a start in the start latency histogram."""
    return labels(target=target, kernelspec=spec, outcome=outcome, pooled=pooled)

"""The agent's Prometheus metrics (prometheus_client, a registry per agent) and the loopback HTTP
endpoint that serves them in the text format 0.0.4."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from edge_agent.logs import get_logger

log = get_logger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """Every metric the agent updates as it works; values read from the running agent at scrape time
    come from collectors (`add_collector`)."""

    def __init__(self) -> None:
        prometheus_client.disable_created_metrics()  # no *_created series: they mean nothing to operators
        self.registry = CollectorRegistry()
        r = self.registry
        self.windows = Counter("edge_agent_windows_total", "Windows scored, per source", ["source"], registry=r)
        self.alerts = Counter("edge_agent_alerts_total", "Alert events emitted, per source and type",
                              ["source", "type"], registry=r)
        self.inference_errors = Counter("edge_agent_inference_errors_total",
                                        "Batches of windows whose inference failed", registry=r)
        self.last_score = Gauge("edge_agent_last_score", "Anomaly score of the last window", ["source"], registry=r)
        self.stage_seconds = Histogram("edge_agent_stage_seconds",
                                       "Per-stage processing time (queue, resample, embed, score, decide)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.window_latency = Histogram("edge_agent_window_latency_seconds", "Window complete -> decision published",
                                        ["source"], buckets=LATENCY_BUCKETS, registry=r)

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """`collect()` is called at every scrape for metrics that are cheaper to read than to push."""
        self.registry.register(_CallbackCollector(collect))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CallbackCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must still answer with the other metrics
            log.exception("metrics_collector_failed")


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics_request", request=format % args)


class MetricsServer:
    """GET /metrics (or /) on host:port (default loopback); port 0 picks a free one (see `.port`)."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int):
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO", "/") not in ("/metrics", "/"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found; metrics are on /metrics\n"]
            body = metrics.exposition()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4),
                                      ("Content-Length", str(len(body)))])
            return [body]

        self.server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

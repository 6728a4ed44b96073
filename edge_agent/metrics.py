"""Prometheus text exposition (format 0.0.4) on a loopback HTTP port, served from a thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("edge_agent.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Counters, gauges and histograms keyed by (name, labels); thread-safe, rendered on scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram] = {}
        self._help: dict[str, str] = {}
        self._collectors: list[Callable[[Metrics], None]] = []

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = float(value)

    def set_counter(self, name: str, value: float, **labels: str) -> None:
        """A counter whose running total is kept elsewhere (e.g. by a capture thread)."""
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._histograms.setdefault(key, Histogram()).observe(value)

    def add_collector(self, collector: Callable[[Metrics], None]) -> None:
        """Called before each scrape to refresh gauges that are cheaper to read than to push."""
        self._collectors.append(collector)

    def counter(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        for collector in list(self._collectors):
            try:
                collector(self)
            except Exception:
                log.exception("event=metrics_collector_failed")
        lines: list[str] = []
        with self._lock:
            self._render_simple(lines, self._counters, "counter")
            self._render_simple(lines, self._gauges, "gauge")
            for name in sorted({k[0] for k in self._histograms}):
                self._header(lines, name, "histogram")
                for (n, labels), hist in sorted(self._histograms.items()):
                    if n != name:
                        continue
                    for bound, count in zip(hist.buckets, hist.counts, strict=True):
                        lines.append(f"{name}_bucket{_labels(labels, le=_num(bound))} {count}")
                    lines.append(f"{name}_bucket{_labels(labels, le='+Inf')} {hist.total}")
                    lines.append(f"{name}_sum{_labels(labels)} {_num(hist.sum)}")
                    lines.append(f"{name}_count{_labels(labels)} {hist.total}")
        return "\n".join(lines) + "\n"

    def _render_simple(self, lines: list[str], table: dict, kind: str) -> None:
        for name in sorted({k[0] for k in table}):
            self._header(lines, name, kind)
            for (n, labels), value in sorted(table.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def _header(self, lines: list[str], name: str, kind: str) -> None:
        if name in self._help:
            lines.append(f"# HELP {name} {self._help[name]}")
        lines.append(f"# TYPE {name} {kind}")


def _num(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(labels: tuple[tuple[str, str], ...], **extra: str) -> str:
    items = list(labels) + list(extra.items())
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsServer:
    """GET /metrics on host:port (default loopback); port 0 picks a free one (see `.port`)."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("event=metrics_request " + format, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

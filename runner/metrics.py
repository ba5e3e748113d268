"""Prometheus export of the counters the native core keeps per queue (optional dependency
``prometheus-client``; enabled by ``runner: metrics: prometheus_port``).

Nothing is counted here: each scrape reads the core's counters, so serving IO pays nothing
for the exporter.
"""
from __future__ import annotations

import logging

log = logging.getLogger("ublk_runner.metrics")


class RunnerCollector:
    def __init__(self, servers_fn):
        self._servers = servers_fn

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        reqs = CounterMetricFamily("ublk_requests", "Requests completed", labels=["device", "queue", "op"])
        nbytes = CounterMetricFamily("ublk_bytes", "Bytes transferred", labels=["device", "queue", "op"])
        errors = CounterMetricFamily("ublk_errors", "Requests completed with an error", labels=["device", "queue"])
        inflight = GaugeMetricFamily("ublk_in_flight", "Requests held by the handler", labels=["device", "queue"])
        lat = HistogramMetricFamily("ublk_request_latency_seconds",
                                    "Time from delivery to commit", labels=["device", "queue"])
        for srv in list(self._servers()):
            for q_id, st in srv.stats()["queues"].items():
                q = str(q_id)
                for op, n in st["ops"].items():
                    reqs.add_metric([srv.name, q, op], n)
                for op, n in st["bytes"].items():
                    nbytes.add_metric([srv.name, q, op], n)
                errors.add_metric([srv.name, q], st["errors"])
                inflight.add_metric([srv.name, q], st["in_flight"])
                # bucket i holds latencies below 2**i microseconds
                buckets, total = [], 0
                for i, n in enumerate(st["latency_us_log2"]):
                    total += n
                    buckets.append((f"{(1 << i) / 1e6:g}", total))
                buckets[-1] = ("+Inf", total)
                lat.add_metric([srv.name, q], buckets, sum_value=float("nan"))
        yield from (reqs, nbytes, errors, inflight, lat)


def start_exporter(port: int, addr: str, servers_fn) -> bool:
    try:
        from prometheus_client import REGISTRY, start_http_server
    except ImportError:
        log.error("metrics.prometheus_port is set but prometheus-client is not installed "
                  "(pip install 'ublk-runner[metrics]'); not exporting")
        return False
    REGISTRY.register(RunnerCollector(servers_fn))
    start_http_server(port, addr)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
    return True

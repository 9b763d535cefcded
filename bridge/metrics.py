"""Operational figures of ``iotcls serve``, kept as plain numbers and exported on demand.

The hot path only adds to integers and to numpy bucket arrays (one vectorised call per
batch); nothing touches prometheus-client until a scrape asks. Off by default, the numbers
are still kept: the shutdown summary and the tests read them directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Prometheus-style cumulative histogram over fixed upper bounds (plus +Inf)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = np.asarray(bounds, np.float64)
        self.counts = np.zeros(len(bounds) + 1, np.int64)
        self.sum = 0.0

    def observe(self, values: np.ndarray | list[float] | float) -> None:
        v = np.atleast_1d(np.asarray(values, np.float64))
        if v.size == 0:
            return
        idx = np.searchsorted(self.bounds, v, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.sum += float(v.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (inf when beyond the last)."""
        n = self.count
        if n == 0:
            return math.nan
        k = int(np.searchsorted(np.cumsum(self.counts), math.ceil(q * n), side="left"))
        return float(self.bounds[k]) if k < len(self.bounds) else math.inf

    def cumulative(self) -> list[tuple[str, int]]:
        cum = np.cumsum(self.counts)
        out = [(_le(b), int(c)) for b, c in zip(self.bounds, cum[:-1])]
        out.append(("+Inf", int(cum[-1])))
        return out


def _le(b: float) -> str:
    return repr(float(b))


@dataclass
class ServeMetrics:
    records_in: int = 0
    labelled: int = 0  # records scored
    labels_sent: int = 0  # label events sent to Zeek (log policy)
    labels_suppressed: int = 0  # scored, not sent by the log policy
    labels_dropped: int = 0  # label events dropped on the way to Zeek (its queue was full)
    labels_explained: int = 0  # labels with the full trust decision (scorers.explain)
    shed: dict[str, int] = field(default_factory=dict)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)  # (socket, kind)
    batches_sent: int = 0
    batches_resent: int = 0
    scorers_lost: int = 0
    scorer_restarts: int = 0
    queue_depth: int = 0
    inflight: int = 0
    scorers: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    score_ms: Histogram = field(
        default_factory=lambda: Histogram(tuple(b * 1000 for b in LATENCY_BUCKETS_S))
    )
    # counters kept elsewhere (the Zeek client's), read when reported
    rejected_sources: list[Callable[[], dict[tuple[str, str], int]]] = field(default_factory=list)
    # counters and gauges kept elsewhere, read when scraped: (name, help, read)
    counter_sources: list[tuple[str, str, Callable[[], float]]] = field(default_factory=list)
    gauge_sources: list[tuple[str, str, Callable[[], float]]] = field(default_factory=list)

    def count_restart(self) -> None:
        self.scorer_restarts += 1

    def all_rejected(self) -> dict[tuple[str, str], int]:
        out = dict(self.rejected)
        for source in self.rejected_sources:
            for k, v in source().items():
                out[k] = out.get(k, 0) + v
        return out

    def add_shed(self, reason: str, n: int = 1) -> None:
        self.shed[reason] = self.shed.get(reason, 0) + n

    def add_rejected(self, socket: str, kind: str) -> int:
        k = (socket, kind)
        self.rejected[k] = self.rejected.get(k, 0) + 1
        return self.rejected[k]

    @property
    def shed_total(self) -> int:
        return sum(self.shed.values())

    def summary(self) -> str:
        """One line for the log: what came in, what went out, what was dropped and why."""
        shed = ",".join(f"{k}:{v}" for k, v in sorted(self.shed.items())) or "none"
        rej = (
            ",".join(f"{s}/{k}:{v}" for (s, k), v in sorted(self.all_rejected().items())) or "none"
        )
        p99 = self.latency.quantile(0.99)
        return (
            f"records_in={self.records_in} labelled={self.labelled} "
            f"labels_sent={self.labels_sent} suppressed={self.labels_suppressed} "
            f"labels_dropped={self.labels_dropped} explained={self.labels_explained} "
            f"shed={self.shed_total} ({shed}) pending={self.queue_depth + self.inflight} "
            f"rejected=({rej}) resent_batches={self.batches_resent} "
            f"scorers_lost={self.scorers_lost} latency_p99<={p99 * 1000:.1f}ms"
        )


class PrometheusExporter:
    """Serves :class:`ServeMetrics` at ``http://address:port/metrics`` (own registry)."""

    def __init__(self, metrics: ServeMetrics, address: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(metrics))
        try:
            self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:  # the address in the message: which port is busy, and where
            host = f"[{address}]" if ":" in address else address
            raise OSError(
                f"cannot serve metrics on http://{host}:{port}/metrics: {e.strerror or e}"
            ) from None
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Collector:
    def __init__(self, m: ServeMetrics):
        self.m = m

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.m
        for name, doc, value in (
            ("iotcls_records_in", "Flow records received from Zeek", m.records_in),
            ("iotcls_labels_out", "Records scored (labelled)", m.labelled),
            ("iotcls_labels_sent", "Label events sent to Zeek (log policy)", m.labels_sent),
            ("iotcls_labels_suppressed", "Labels not sent by the log policy", m.labels_suppressed),
            ("iotcls_labels_dropped", "Label events dropped on the way to Zeek", m.labels_dropped),
            ("iotcls_labels_explained", "Labels given the full trust decision", m.labels_explained),
            ("iotcls_batches_sent", "Batches sent to scorers", m.batches_sent),
            ("iotcls_batches_resent", "Batches re-sent after a scorer was lost", m.batches_resent),
            ("iotcls_scorers_lost", "Scorers lost (died, left or went silent)", m.scorers_lost),
            ("iotcls_scorer_restarts", "Scorer processes restarted", m.scorer_restarts),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        shed = CounterMetricFamily(
            "iotcls_records_shed", "Records shed, by reason", labels=["reason"]
        )
        for reason, v in sorted(m.shed.items()):
            shed.add_metric([reason], v)
        yield shed
        rej = CounterMetricFamily(
            "iotcls_messages_rejected",
            "Messages rejected, by socket and kind",
            labels=["socket", "kind"],
        )
        for (sock, kind), v in sorted(m.all_rejected().items()):
            rej.add_metric([sock, kind], v)
        yield rej
        yield GaugeMetricFamily(
            "iotcls_queue_depth", "Records waiting for a scorer", value=m.queue_depth
        )
        yield GaugeMetricFamily("iotcls_inflight_records", "Records at scorers", value=m.inflight)
        yield GaugeMetricFamily("iotcls_scorers", "Scorers connected", value=m.scorers)
        for name, doc, read in m.gauge_sources:
            yield GaugeMetricFamily(name, doc, value=read())
        for name, doc, read in m.counter_sources:
            yield CounterMetricFamily(name, doc, value=read())
        for name, doc, h in (
            ("iotcls_label_latency_seconds", "Record arrival to label sent", m.latency),
            ("iotcls_batch_size", "Records per batch sent to a scorer", m.batch_size),
            ("iotcls_score_milliseconds", "Scorer time per forward pass", m.score_ms),
        ):
            yield HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum)

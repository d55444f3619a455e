"""``GET /metrics``: the server's counters in the Prometheus text format (``prometheus_client``).

Nothing is counted here: at scrape time a collector reads the numbers their owners keep
(``ModelMetrics`` per model, the ``Admission``'s reply counts, the ring, the backend) into
metric families of a ``CollectorRegistry`` of this application's own, so two servers in one
process never share or clash on the global registry.

Series (all per ``model`` where they have the label):

* ``streamgpu_request_duration_seconds`` histogram: end to end (header in to reply made), OK frames.
* ``streamgpu_queue_duration_seconds`` histogram: payload complete to batch launch, frames that ran.
* ``streamgpu_transfer_duration_seconds`` / ``streamgpu_compute_duration_seconds`` histograms: per batch,
  launch to copied, copied to results on the host.
* ``streamgpu_batch_size`` histogram: frames per batch.
* ``streamgpu_replies_total{model, status}`` counter: every reply by status name (OK, BAD_FRAME,
  TOO_LARGE, UNAUTHORIZED, ...), of every front end (TCP, ingest workers, UDP, WebSocket, HTTP,
  raw). ``model=""`` counts replies before any model is known (refused handshakes: WELCOME
  statuses; connection replies) and frames naming no served model.
* gauges: ``streamgpu_queue_length`` and ``streamgpu_batches_in_flight`` (per model),
  ``streamgpu_model_sms{model, device}`` (the SMs its kernels may use: its ``sm_share``; CUDA backend only),
  ``streamgpu_ring_used_bytes``, ``streamgpu_ring_capacity_bytes``, ``streamgpu_connections``,
  ``streamgpu_frames_in_flight``, ``streamgpu_gpu_memory_bytes{device, kind=allocated|reserved|total}``
  (CUDA backend only).
* ``streamgpu_gc_pause_seconds{generation}`` histogram: how long Python's garbage collector stopped the
  process (the loop included) while servers ran, by generation 0-2; process-wide, so every server of a
  process shows the same (``streamgpu.loops.GC_PAUSES``).
* with ingest workers: the gauges ``streamgpu_ingest_workers`` (``ingest_workers``) and
  ``streamgpu_ingest_workers_alive`` (those running now: fewer while a dead one awaits or fails its
  restart), and the counter ``streamgpu_ingest_worker_restarts_total``.
* per UDP listener (``host`` and ``port`` labels): ``streamgpu_udp_events_total{host, port, event}``
  counter, every count of docs/PROTOCOL.md section 11 (``datagrams``, ``frames``, ``incomplete``,
  ``late``, ``duplicates``, ``evicted``, ``no_space``, bad datagrams by kind, reply datagrams, ...),
  and the gauges ``streamgpu_udp_producers{host, port}`` and ``streamgpu_udp_partial_frames{host, port}``
  (frames in reassembly).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from streamgpu.ingest import udp
from streamgpu.loops import GC_PAUSES
from streamgpu.metrics import BATCH_SIZE_BUCKETS, Histogram
from streamgpu.server import Server
from streamgpu.web.app import SERVER_KEY

REGISTRY_KEY = web.AppKey("streamgpu.metrics.registry", CollectorRegistry)

_TIMES = (
    ("request", "e2e_s", "End to end, frame header received to reply made (OK frames)"),
    ("queue", "queue_s", "Payload complete to batch launch (frames that ran)"),
    ("transfer", "transfer_s", "Batch launch to its frames copied to the device (per batch)"),
    ("compute", "compute_s", "Frames copied to results on the host (per batch)"),
)


class ServerCollector(Collector):
    """Reads one ``Server``'s counters into Prometheus metric families at each scrape."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server
        if not server.initialized:
            return
        states = server.model_states()
        for short, attr, doc in _TIMES:
            family = HistogramMetricFamily(f"streamgpu_{short}_duration_seconds", doc, labels=["model"])
            for state in states:
                hist: Histogram = getattr(state.metrics, attr)
                family.add_metric([state.name], hist.cumulative(), sum_value=hist.sum)
            yield family
        sizes = HistogramMetricFamily("streamgpu_batch_size", "Frames per batch", labels=["model"])
        for state in states:
            batch = Histogram(tuple(float(b) for b in BATCH_SIZE_BUCKETS))
            for size, n in state.metrics.batch_sizes.items():
                batch.observe_many(size, n)
            sizes.add_metric([state.name], batch.cumulative(), sum_value=batch.sum)
        yield sizes
        replies = CounterMetricFamily(
            "streamgpu_replies", 'Replies sent, by status; model="" before a model is known', labels=["model", "status"]
        )
        for model, status, count in server.replies.items():
            replies.add_metric([model, status.name], count)
        yield replies
        queue = GaugeMetricFamily("streamgpu_queue_length", "Frames waiting for a batch", labels=["model"])
        flight = GaugeMetricFamily("streamgpu_batches_in_flight", "Batches launched, not finished", labels=["model"])
        for state in states:
            queue.add_metric([state.name], state.queue_length)
            flight.add_metric([state.name], state.in_flight_batches)
        yield queue
        yield flight
        sms = GaugeMetricFamily("streamgpu_model_sms", "SMs a model's kernels may use on a device (its sm_share)",
                                labels=["model", "device"])  # fmt: skip
        for state in states:
            for device, count in state.sms.items():
                sms.add_metric([state.name, device], count)
        yield sms
        pool = server.pool
        yield GaugeMetricFamily("streamgpu_ring_used_bytes", "Receive ring bytes in use", value=server.ring_used_bytes)
        yield GaugeMetricFamily("streamgpu_ring_capacity_bytes", "Receive ring size", value=pool.capacity)
        yield GaugeMetricFamily("streamgpu_connections", "Producer connections open", value=server.connections)
        yield GaugeMetricFamily("streamgpu_frames_in_flight", "Frames received, reply not made",
                                value=server.frames_in_flight)  # fmt: skip
        pauses = HistogramMetricFamily("streamgpu_gc_pause_seconds", "Garbage collector pauses while servers run "
                                       "(the process stands still), by generation", labels=["generation"])  # fmt: skip
        for generation, hist in enumerate(GC_PAUSES.by_generation):
            pauses.add_metric([str(generation)], hist.cumulative(), sum_value=hist.sum)
        yield pauses
        listeners = server.metrics()["listeners"]
        yield from _worker_families([stats for stats in listeners if "workers_alive" in stats])
        yield from _udp_families([stats for stats in listeners if stats["kind"] == "udp"])
        memory = server.device_memory()
        if memory:
            gpu = GaugeMetricFamily("streamgpu_gpu_memory_bytes", "Device memory", labels=["device", "kind"])
            for device, kinds in memory.items():
                for kind, nbytes in kinds.items():
                    gpu.add_metric([device, kind], nbytes)
            yield gpu


def _worker_families(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    """The ingest workers' processes (``ingest_workers``; at most one listener has them): how many should
    run, how many do, and how many were started in place of dead ones."""
    for stats in listeners:
        yield GaugeMetricFamily("streamgpu_ingest_workers", "Ingest worker processes configured (ingest_workers)",
                                value=stats["ingest_workers"])  # fmt: skip
        yield GaugeMetricFamily("streamgpu_ingest_workers_alive", "Ingest worker processes running",
                                value=stats["workers_alive"])  # fmt: skip
        yield CounterMetricFamily("streamgpu_ingest_worker_restarts", "Ingest workers started in place of dead ones "
                                  "(failed starts included)", value=stats["worker_restarts"])  # fmt: skip


def _udp_families(listeners: list[dict[str, Any]]) -> Iterator[Metric]:
    if not listeners:
        return
    events = CounterMetricFamily("streamgpu_udp_events", "UDP listener counts (docs/PROTOCOL.md section 11)",
                                 labels=["host", "port", "event"])  # fmt: skip
    for stats in listeners:
        for event in udp.COUNTERS:
            events.add_metric([stats["host"], str(stats["port"]), event], stats.get(event, 0))
    yield events
    for gauge, doc in udp.GAUGES.items():
        family = GaugeMetricFamily(f"streamgpu_udp_{gauge}", doc, labels=["host", "port"])
        for stats in listeners:
            family.add_metric([stats["host"], str(stats["port"])], stats[gauge])
        yield family


def registry_for(server: Server) -> CollectorRegistry:
    """A registry of its own holding ``server``'s collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    return registry


async def metrics(request: web.Request) -> web.Response:
    # The text format, or OpenMetrics when the scraper asks for it (as prometheus_client's own handlers do).
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(request.app[REGISTRY_KEY]), headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    app[REGISTRY_KEY] = registry_for(app[SERVER_KEY])
    app.router.add_get("/metrics", metrics)

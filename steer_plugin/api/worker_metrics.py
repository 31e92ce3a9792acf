"""The workers' steering metrics on the API server's /metrics.

When /metrics is scraped, the middleware asks every worker of every engine for its snapshot over
vLLM's RPC (`Worker.steer_metrics`, see `worker/metrics.py`), merges them (`core/metric_families.py`)
and adds them to vLLM's reply, in the Prometheus text format vLLM's /metrics answers in. vLLM's own metrics and the API server's `steer_requests*` counters are vLLM's reply.
Every data-parallel engine, pipeline rank and node is reached this way, whatever process or host it
runs on. The scrape asks vLLM for an uncompressed reply, so the two can be joined.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from steer_plugin.api.reply import holding
from steer_plugin.core.metric_families import FAMILIES, Family, Snapshot, merge
from steer_plugin.vllm_surface import app_engine_client, collective_rpc_all

logger = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0
"""A scrape waits at most this long for the workers (busy engines answer between steps)."""


def _families(snapshot: Snapshot, families: tuple[Family, ...]) -> list:
    out = []
    for family in families:
        series = snapshot.get(family.name)
        if not series:
            continue
        if family.kind == "counter":
            metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
            for labels, value in series.items():
                metric.add_metric(labels, value)
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
            for labels, value in series.items():
                metric.add_metric(labels, value)
        else:
            metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
            bounds = [str(float(b)) for b in family.buckets] + ["+Inf"]
            for labels, (counts, total) in series.items():
                cumulative, running = [], 0
                for bound, count in zip(bounds, counts):
                    running += count
                    cumulative.append((bound, running))
                metric.add_metric(labels, cumulative, total)
        out.append(metric)
    return out


class _Collected:
    def __init__(self, families: list):
        self._families = families

    def collect(self):
        return self._families


def exposition(snapshot: Snapshot, families: tuple[Family, ...] = FAMILIES) -> bytes:
    """The merged snapshot in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(_families(snapshot, families)))
    return generate_latest(registry)


async def collect(app) -> Snapshot:
    """Every worker's snapshot, merged; empty (and logged) when the workers do not answer in time."""
    try:
        replies = await asyncio.wait_for(collective_rpc_all(app_engine_client(app), "steer_metrics"), RPC_TIMEOUT_S)
    except Exception as e:  # a scrape must still get vLLM's own metrics
        logger.warning("action=worker_metrics_unavailable reason=%s", e)
        return {}
    return merge([reply for reply in replies if reply])


async def serve(inner, scope, receive, send) -> None:
    """Answer a /metrics scrape: vLLM's reply (from the ASGI app `inner`) with the workers' series
    joined to it."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
    snapshot = await collect(scope["app"])

    async def joined(start: dict, body: bytes) -> bytes:
        return body + exposition(snapshot) if start["status"] == 200 and snapshot else body

    await inner({**scope, "headers": headers}, receive, holding(send, lambda start: True, joined))

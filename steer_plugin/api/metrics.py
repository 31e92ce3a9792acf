"""API-side Prometheus counters: requests admitted and refused. They live in the API server
process's registry (vLLM's multiprocess directory when it runs several API servers); the workers'
series join them on /metrics through `worker_metrics.py`."""

from __future__ import annotations

from prometheus_client import Counter

REQUESTS = Counter("steer_requests", "Requests admitted to the engine, by whether they carry steering (feature "
                   "clamps or vectors)", ["steered"])
REJECTED = Counter("steer_requests_rejected", "Requests rejected for invalid steering fields (HTTP 400)")


def record_admission(steered: bool) -> None:
    REQUESTS.labels(steered="true" if steered else "false").inc()

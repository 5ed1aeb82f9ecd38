"""Prometheus metrics of the gateway: request counts and latency per route, episodes submitted.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so several apps in one process
(tests) never collide on metric names. Routes are labelled by their template (``/v1/episodes/{episode_id}``),
never by the raw path, to keep label cardinality bounded; unmatched paths share the label ``unmatched``.

Limits: the latency of a streaming response (SSE) is measured until its last byte, so event streams
show up as long requests; they are labelled by route and can be filtered out.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics", "MetricsMiddleware"]


class GatewayMetrics:
    """The gateway's collectors, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asyncthink_gateway_requests",
            "HTTP requests handled, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "asyncthink_gateway_request_duration_seconds",
            "Time to answer an HTTP request (to its last byte), by method and route template.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.episodes_submitted = Counter(
            "asyncthink_gateway_episodes_submitted",
            "Episodes stored and queued for an organizer, by task and mode.",
            ["task", "mode", "api"],
            registry=self.registry,
        )
        # The scaling signals (docs/scaling.md), refreshed on each scrape and by the backpressure check:
        # what an autoscaler of organizers and workers reads (the k8s HPA through an external metric).
        self.problems_queued = Gauge(
            "asyncthink_problems_queued",
            "Submitted episodes no organizer has taken yet (the problems stream's consumer-group lag).",
            registry=self.registry,
        )
        self.episodes_in_flight = Gauge(
            "asyncthink_episodes_in_flight",
            "Submitted episodes not finished: queued plus running on an organizer.",
            registry=self.registry,
        )
        self.worker_queue_depth = Gauge(
            "asyncthink_worker_queue_depth",
            "Forked worker tasks waiting in a Celery queue (every priority level), by queue.",
            ["queue"],
            registry=self.registry,
        )
        self.backpressure = Counter(
            "asyncthink_gateway_backpressure",
            "Submissions answered 429 because the queue was too deep or too many episodes were in flight.",
            ["reason"],
            registry=self.registry,
        )
        self.submit_failures = Counter(
            "asyncthink_gateway_submit_failures",
            "Submissions refused after validation because the database or the bus failed.",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (it does not buffer streaming responses) that counts and times requests."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)

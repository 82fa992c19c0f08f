"""Prometheus `/metrics` for the API: job, queue, block and worker metrics read from the database at scrape time,
plus the API's own request latency. Unauthenticated like /healthz, outside /v1 and the OpenAPI schema."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..core.context import ServiceContext
from .metrics import build_registry
from .middleware import HttpMetrics, RequestMetricsMiddleware

__all__ = ["install_metrics"]


def install_metrics(app: FastAPI, ctx: ServiceContext) -> None:
    registry = build_registry(ctx)
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetricsMiddleware, metrics=HttpMetrics(registry))

    @app.get("/metrics", include_in_schema=False, tags=["observability"])
    def metrics() -> Response:  # sync: the collector's queries run in the thread pool, not on the event loop
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

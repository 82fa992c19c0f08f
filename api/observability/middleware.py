"""API request latency and counts by method, route template and status code (a plain ASGI middleware, so the
Server-Sent Events stream is neither buffered nor cut; its observation is the whole stream's duration).

/metrics is unauthenticated, so no label takes a value a client chooses: methods outside the standard set count as
`other`, paths no route knows as `<unmatched>`, and the status is the integer the app answered."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
UNMATCHED = "<unmatched>"  # any path no route knows: one label value, whatever is scanned
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"  # any other method (`XYZ123`, `get`, WebDAV's...): one label value


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["method", "route", "status"]
        self.latency = Histogram("wkvq_http_request_duration_seconds",
                                 "API request latency by method, route template and status code", labels,
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("wkvq_http_requests", "API requests by method, route template and status code",
                                labels, registry=registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method_label(method), route, str(int(status)))
        self.latency.labels(*labels).observe(seconds)
        self.requests.labels(*labels).inc()


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else OTHER_METHOD


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/jobs/{job_id}`), never the raw path: ids would explode cardinality.

    FastAPI keeps an included router's routes unprefixed (`scope["route"].path` is `/jobs/{job_id}`); the full
    template is its effective route's `path_format` or, failing that, the raw path minus the route's rendered
    tail (the router prefix, static here) plus the route's template.
    """
    effective = (scope.get("fastapi") or {}).get("effective_route_context")
    template = getattr(effective, "path_format", None)
    if isinstance(template, str) and template:
        return template
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return UNMATCHED
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    try:
        rendered = template.format(**scope.get("path_params", {}))
    except (KeyError, IndexError, ValueError):
        return template
    return path[:len(path) - len(rendered)] + template if path.endswith(rendered) else template


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless the app starts a response, an exception escaped and the server answers 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = 500  # also after the status line: the response was cut short (a download found corrupt)
            raise
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - start)

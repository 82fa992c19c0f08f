"""Server-rendered dashboard (Jinja2 + htmx) mounted at `/`: sign-in by API key, jobs, live progress, queue."""

from .endpoints import router

__all__ = ["router"]

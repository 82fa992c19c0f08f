"""`/docs` (Swagger UI) from files shipped here instead of a CDN, so that it works offline; and `/favicon.ico`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).resolve().parent
FAVICON = HERE.parent / "dashboard" / "static" / "favicon.ico"


def install_docs(app: FastAPI) -> None:
    """Call on an app made with docs_url=None."""
    app.mount("/docs/static", StaticFiles(directory=HERE / "static"), name="docs-static")

    @app.get("/docs", include_in_schema=False, tags=["docs"])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} · API",
                                   swagger_js_url="/docs/static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/static/swagger-ui.css", swagger_favicon_url="/favicon.ico")

    @app.get("/favicon.ico", include_in_schema=False, tags=["docs"])
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

"""create_app(): routers under /v1, one handler for service errors."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DataError, OperationalError

from .core.config import Settings
from .core.context import ServiceContext
from .core.errors import InvalidField, ServiceError
from .core.limits import BodyLimits, validation_error
from .core.redact import public_message
from .core.storage import StorageError
from .dashboard import router as dashboard_router
from .datasets.endpoints import router as datasets_router
from .docs_ui import install_docs
from .health.endpoints import router as health_router
from .jobs.endpoints import router as jobs_router
from .jobs.streams import StreamHub
from .observability import install_metrics


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}"


def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    if isinstance(exc, InvalidField):
        detail = [{"loc": exc.loc, "msg": exc.message, "type": "value_error"}]
    else:
        detail = exc.message
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else exc.headers
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _database_down(_request: Request, exc: OperationalError) -> JSONResponse:
    return JSONResponse({"detail": "database unavailable, try again shortly"}, status_code=503,
                        headers={"Retry-After": "5"})


def _invalid_value(_request: Request, exc: DataError) -> JSONResponse:
    """A value the database cannot hold or compare (Postgres: text with NUL, an integer past bigint), wherever a
    request carried it (path, query, form, JSON). SQLite takes such values: there the same request finds nothing."""
    return JSONResponse({"detail": "invalid value: text with a NUL character or a number out of range"},
                        status_code=422)


def _store_down(request: Request, exc: StorageError) -> JSONResponse:
    reason = public_message(str(exc), request.app.state.ctx)
    return JSONResponse({"detail": f"artifact store unavailable, try again shortly ({reason})"}, status_code=503,
                        headers={"Retry-After": "5"})


def create_app(ctx: ServiceContext | None = None) -> FastAPI:
    owned = ctx is None
    ctx = ctx or ServiceContext.from_settings(Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owned:
            ctx.close()

    app = FastAPI(title="WKVQuant calibration service", version="1.0.0", lifespan=lifespan,
                  generate_unique_id_function=_operation_id, docs_url=None, redoc_url=None,  # install_docs
                  description="Post-training W4KV4 quantization jobs for LLaMA-family models, by team.")
    app.state.ctx = ctx
    app.state.streams = StreamHub(ctx)
    v1 = APIRouter(prefix="/v1")
    v1.include_router(jobs_router)
    v1.include_router(datasets_router)
    app.include_router(v1)
    app.include_router(health_router)
    app.include_router(dashboard_router)
    install_docs(app)
    app.add_middleware(BodyLimits, max_body=ctx.settings.MAX_BODY_BYTES, max_upload=ctx.settings.MAX_UPLOAD_BYTES,
                       upload_paths=frozenset({"/v1/datasets", "/dashboard/jobs/new"}))
    install_metrics(app, ctx)  # outermost: it also counts the requests refused by the limits
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(DataError, _invalid_value)
    app.add_exception_handler(StorageError, _store_down)
    return app

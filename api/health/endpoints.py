from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import ContextDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
def readyz(ctx: ContextDep) -> JSONResponse:
    """The database, the broker and the artifact store are reachable."""
    checks: dict[str, str] = {}
    for name, probe in (("database", lambda: _ping_db(ctx)), ("broker", ctx.dispatcher.ping),
                        ("storage", ctx.store.check)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # a readiness probe reports, it does not raise
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


def _ping_db(ctx) -> None:
    with ctx.engine.connect() as conn:
        conn.execute(text("SELECT 1"))

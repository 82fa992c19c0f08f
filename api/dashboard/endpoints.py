"""The dashboard's pages: thin routes over job_service, dataset_service, team_service and queue_service.

Signed in by a team API key, exchanged for a session token (api/dashboard/sessions.py) kept in an HttpOnly,
SameSite=Strict cookie (Secure when served over https); forms that change state are POST.
Live parts are htmx fragments polled while a job is queued or running."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy.orm import Session

from ..core.errors import Conflict, NotFound, Unauthorized
from ..deps import ContextDep, SessionDep, released
from ..jobs.download import ranged_download
from ..jobs.service import job_service
from ..models import JobStatus, Team
from ..queue.service import queue_service
from .forms import JobForm, form_context, submit_form
from .sessions import end_session, session_team, start_session
from .views import job_detail, job_row
from .web import (COOKIE, HERE, HOME, LOGOUT, SIGNED_IN, SIGNIN, DashboardRoute, DashboardTeam, clear_cookie,
                  over_https, render, safe_next, set_cookie)

router = APIRouter(tags=["dashboard"], include_in_schema=False, route_class=DashboardRoute)

PAGE_SIZE = 20
MAX_PAGE = 10_000_000  # an offset (page x size) the database's integers hold
STATUSES = [s.value for s in JobStatus]
STATIC = {"htmx.min.js": "text/javascript", "dashboard.css": "text/css"}


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


@router.get("/")
def index() -> RedirectResponse:
    return see_other(HOME)


@router.get("/dashboard")
def dashboard_index() -> RedirectResponse:
    return see_other(HOME)


@router.get("/dashboard/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=3600"})


# ------------------------------------------------------------------------------------------------ sign-in


@router.get("/dashboard/signin")
def signin_page(request: Request, next: str | None = None) -> Response:
    return render(request, "signin.html", {"next": safe_next(next)})


@router.post("/dashboard/signin")
def signin(request: Request, session: SessionDep, api_key: Annotated[str, Form()] = "",
           next: Annotated[str, Form()] = HOME) -> Response:
    key = api_key.strip()
    try:
        token = start_session(session, key)
    except Unauthorized as exc:
        message = exc.message if key.startswith("wkvq_") else "paste a team API key; it starts with wkvq_"
        return render(request, "signin.html", {"next": safe_next(next), "error": message}, status_code=401)
    response = see_other(f"{SIGNED_IN}?next={quote(safe_next(next), safe='/')}")
    set_cookie(request, response, token)
    return response


@router.get(SIGNED_IN)
def signin_check(request: Request, session: SessionDep, next: str | None = None) -> Response:
    """On to `next` if the browser sent the new cookie back; otherwise say why the sign-in did not stick."""
    try:
        session_team(session, request.cookies.get(COOKIE))
    except Unauthorized:
        reason = ("this page was opened over http, and the cookie is Secure because WKVQ_PUBLIC_URL is https: open "
                  "the dashboard at that address" if over_https(request) and request.url.scheme != "https"
                  else "allow cookies for this site, then sign in again")
        return render(request, "signin.html", {"next": safe_next(next), "error": "The key was accepted, but this "
                      f"browser did not keep the sign-in cookie: {reason}."}, status_code=401)
    return see_other(safe_next(next))


@router.post(LOGOUT)
def logout(request: Request, session: SessionDep) -> Response:
    end_session(session, request.cookies.get(COOKIE))
    response = see_other(SIGNIN)
    clear_cookie(request, response)
    return response


# ------------------------------------------------------------------------------------------------ jobs


@router.get("/dashboard/jobs")
def jobs_page(request: Request, session: SessionDep, team: DashboardTeam, status: str | None = None,
              page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
              size: Annotated[int, Query(ge=1, le=100)] = PAGE_SIZE) -> Response:
    status = status if status in STATUSES else None  # an unknown filter shows every job
    jobs, count = job_service.list(session, team=team, status=status, gpu_class=None, limit=size,
                                   offset=(page - 1) * size)
    rows = [job_row(job) for job in jobs]
    return render(request, "jobs.html", {
        "rows": rows, "count": count, "status": status, "statuses": STATUSES,
        "page": page, "size": size, "pages": max(1, -(-count // size)), "first": (page - 1) * size + 1,
        "live": any(not JobStatus(r["job"].status).terminal for r in rows), "nav": "jobs"})


@router.get("/dashboard/jobs/new")
def new_job_page(request: Request, ctx: ContextDep, session: SessionDep, team: DashboardTeam) -> Response:
    return render(request, "job_new.html", form_context(ctx, session, team, JobForm.initial(ctx)))


@router.post("/dashboard/jobs/new")
def new_job(request: Request, ctx: ContextDep, session: SessionDep, team: DashboardTeam,
            form: Annotated[JobForm, Form()]) -> Response:
    job, errors = submit_form(ctx, session, team, form)
    if job is None:
        return render(request, "job_new.html", form_context(ctx, session, team, form, errors), status_code=422)
    return see_other(f"/dashboard/jobs/{job.id}")


@router.get("/dashboard/jobs/{job_id}")
def job_page(request: Request, session: SessionDep, team: DashboardTeam, job_id: str) -> Response:
    return render(request, "job_detail.html", job_detail(session, team=team, job_id=job_id) | {"nav": "jobs"})


@router.get("/dashboard/jobs/{job_id}/fragment")
def job_fragment(request: Request, session: SessionDep, team: DashboardTeam, job_id: str) -> Response:
    return render(request, "_job_live.html", job_detail(session, team=team, job_id=job_id))


@router.post("/dashboard/jobs/{job_id}/cancel")
def cancel_job(request: Request, session: SessionDep, team: DashboardTeam, job_id: str) -> Response:
    try:
        job_service.cancel(session, team=team, job_id=job_id)
    except Conflict as exc:
        return _refused(request, session, team, job_id, exc)
    return see_other(f"/dashboard/jobs/{job_id}")


@router.post("/dashboard/jobs/{job_id}/retry")
def retry_job(request: Request, ctx: ContextDep, session: SessionDep, team: DashboardTeam, job_id: str) -> Response:
    try:
        job_service.retry(ctx, session, team=team, job_id=job_id)
    except Conflict as exc:
        return _refused(request, session, team, job_id, exc)
    return see_other(f"/dashboard/jobs/{job_id}")


@router.post("/dashboard/jobs/{job_id}/delete")
def delete_job(request: Request, ctx: ContextDep, session: SessionDep, team: DashboardTeam, job_id: str) -> Response:
    try:
        job_service.delete(session, ctx.store, team=team, job_id=job_id)
    except Conflict as exc:
        return _refused(request, session, team, job_id, exc)
    return see_other(HOME)


def _refused(request: Request, session: Session, team: Team, job_id: str, exc: Conflict) -> Response:
    context = job_detail(session, team=team, job_id=job_id) | {"nav": "jobs", "notice": exc.message}
    return render(request, "job_detail.html", context, status_code=409)


@router.api_route("/dashboard/jobs/{job_id}/artifacts/{name}", methods=["GET", "HEAD"])
def download_artifact(ctx: ContextDep, session: SessionDep, team: DashboardTeam, job_id: str, name: str,
                      request: Request) -> Response:
    artifact = released(session, job_service.artifact(session, team=team, job_id=job_id, name=name))
    return ranged_download(ctx, artifact, request)


# ------------------------------------------------------------------------------------------------ queue


@router.get("/dashboard/queue")
def queue_page(request: Request, ctx: ContextDep, session: SessionDep, team: DashboardTeam) -> Response:
    summary = queue_service.summary(session, ctx.settings, team=team)
    return render(request, "queue.html", {"summary": summary, "nav": "queue"})

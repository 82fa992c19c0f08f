"""Dashboard plumbing: templates and their filters, cookie sign-in, and a route class that refuses cross-site form
posts, checks the sign-in of a post before its body is read, and turns a missing sign-in into a redirect and a
NotFound into an HTML 404 page (the API's JSON error handler stays as it is)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from ..core.db import utcnow
from ..core.errors import NotFound, Unauthorized
from ..deps import SAFE_METHODS, SessionDep, released
from ..models import Team
from .sessions import SESSION_SECONDS, session_team

HERE = Path(__file__).resolve().parent
COOKIE = "wkvq_session"
SIGNIN = "/dashboard/signin"
SIGNED_IN = "/dashboard/signin/check"  # where a sign-in lands first: tells whether the browser kept the cookie
HOME = "/dashboard/jobs"
LOGOUT = "/dashboard/logout"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def ago(moment: datetime | None) -> str:
    return "–" if moment is None else f"{duration((utcnow() - moment).total_seconds())} ago"


def filesize(size: float | None) -> str:
    if size is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def timestamp(moment: datetime | None) -> str:
    return "–" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _page_globals(request: Request) -> dict[str, Any]:
    return {"team": getattr(request.state, "team", None), "path": request.url.path}


templates = Jinja2Templates(directory=HERE / "templates", context_processors=[_page_globals])
templates.env.filters.update(duration=duration, ago=ago, filesize=filesize, timestamp=timestamp)


def render(request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200) -> Response:
    return templates.TemplateResponse(request, name, context or {}, status_code=status_code)


def safe_next(target: str | None) -> str:
    """Only a dashboard path of this site (no open redirect)."""
    if target and target.startswith("/dashboard/") and not target.startswith("//") and "\\" not in target:
        return target
    return HOME


class SignInRequired(Exception):
    pass


def signed_in_team(request: Request, session: SessionDep) -> Team:
    try:
        team = session_team(session, request.cookies.get(COOKIE))
    except Unauthorized:
        raise SignInRequired() from None
    request.state.team = team  # for the page header
    return released(session, team)


def _check_cookie(request: Request) -> None:
    try:
        with request.app.state.ctx.read_session() as session:
            session_team(session, request.cookies.get(COOKIE))
    except Unauthorized:
        raise SignInRequired() from None


def cross_site(request: Request) -> bool:
    """A browser's post from another origin (another port of this host included, which SameSite cookies do not
    stop): Sec-Fetch-Site other than same-origin/none, or an Origin that is not this service's. Clients that send
    neither header are not browsers, and carry no ambient cookie for an attacker to ride on."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    public_url = request.app.state.ctx.settings.PUBLIC_URL
    if public_url:  # scheme, host and port
        public = urlsplit(public_url)
        return origin.lower() != f"{public.scheme}://{public.netloc}".lower()
    return urlsplit(origin.lower()).netloc != request.headers.get("host", "").lower()  # behind a TLS proxy too


DashboardTeam = Annotated[Team, Depends(signed_in_team)]


def sign_in_redirect(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    back = request.method == "GET" and here.startswith("/dashboard/")  # a POST is not replayed after sign-in
    target = f"{SIGNIN}?next={quote(here, safe='/')}" if back else SIGNIN
    if request.headers.get("HX-Request"):
        response: Response = Response(status_code=401, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if COOKIE in request.cookies:  # expired or revoked: forget it
        clear_cookie(request, response)
    return response


def over_https(request: Request) -> bool:
    """Whether browsers reach the dashboard over https (WKVQ_PUBLIC_URL, else this request): only then is the
    cookie Secure, which a browser drops when it was set over http."""
    public_url = request.app.state.ctx.settings.PUBLIC_URL
    return (urlsplit(public_url).scheme if public_url else request.url.scheme) == "https"


def set_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, path="/", secure=over_https(request), httponly=True,
                        samesite="strict")


def clear_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", secure=over_https(request), httponly=True, samesite="strict")


class DashboardRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                if request.method not in SAFE_METHODS:
                    if cross_site(request):
                        response = render(request, "refused.html", {
                            "heading": "Refused", "message": "This form was posted from another site. Open the "
                                                             "dashboard itself and submit it from there."},
                                          status_code=403)
                        return _secured(response)
                    if request.url.path not in (SIGNIN, LOGOUT):  # signed in before the body is read
                        await run_in_threadpool(_check_cookie, request)
                response = await handler(request)
            except SignInRequired:
                response = sign_in_redirect(request)
            except NotFound as exc:
                response = render(request, "refused.html", {"heading": "Not found", "message": exc.message},
                                  status_code=exc.status_code)  # 404, or 410 for what was deleted
            return _secured(response)

        return route


def _secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response

"""Absolute URLs in API answers are built from `WKVQ_PUBLIC_URL`, never from the request's Host header (a client
chooses that); without it they are root-relative paths, which a client joins with the URL it called."""

from __future__ import annotations

from fastapi import Request


def artifact_url(request: Request, job_id: str, name: str) -> str:
    """The download URL of artifact `name` of job `job_id`: PUBLIC_URL + path, or the path under the app's root."""
    path = request.app.url_path_for("download_artifact", job_id=job_id, name=name)
    public_url = request.app.state.ctx.settings.PUBLIC_URL
    if public_url:
        return public_url.rstrip("/") + path
    return request.scope.get("root_path", "").rstrip("/") + path

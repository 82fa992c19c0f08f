"""No input gives a 5xx, on SQLite and on Postgres: schemathesis against the app's own OpenAPI schema
(authenticated), and hypothesis against the dashboard, whose routes are outside the schema (signed in by cookie)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from api.dashboard import router as dashboard_router
from api.dashboard.forms import JobForm
from api.dashboard.sessions import start_session
from api.dashboard.web import COOKIE
from api.main import create_app

from .conftest import TINY_JOB, team_key

EXAMPLES_PER_OPERATION = 12
EXAMPLES_PER_DASHBOARD_ROUTE = 150
DASHBOARD_ORIGIN = "http://testserver"  # the TestClient's own origin: the accepted path of the CSRF check
FUZZ = settings(max_examples=EXAMPLES_PER_DASHBOARD_ROUTE, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def test_no_operation_answers_5xx(service, client, team_headers):
    """Every operation with generated inputs: authenticated with generated ids, again with the id of a real (ended)
    job of the caller's team (so the generated inputs reach past the 404), and without a key or with a generated
    one (what an anonymous caller can reach before the 401)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    headers = team_headers("fuzz")
    job_id = client.post("/v1/jobs", json=TINY_JOB, headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    runs = ([(op, "generated ids") for op in operations] + [(op, "real job") for op in operations if "{job_id}" in op.path]
            + [(op, "anonymous") for op in operations])
    for operation, mode in runs:

        @given(case=operation.as_strategy(), key=st.one_of(st.none(), st.text(max_size=80)))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case, key):
            if mode == "real job":
                case.path_parameters["job_id"] = job_id
            sent = headers
            if mode == "anonymous":
                sent = {} if key is None else {"Authorization": f"Bearer {key}".encode("utf-8", "ignore")
                                               .decode("latin-1").strip()}
            response = case.call(headers=sent)
            assert response.status_code < 500, (mode, case.method, case.formatted_path, case.body, response.text[:500])

        no_server_error()


# Words Python's json reads as numbers no JSON number holds (1e400: inf); JSON generators never produce them
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
MARK = "wkvq-fuzz-non-finite"


def _places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: the value itself, and each member and item, recursively."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path] + [place for key, item in items for place in _places(item, (*path, key))]


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def test_non_finite_numbers_answer_no_5xx(service, client, team_headers):
    """Every operation with a JSON body: a generated body (valid or not) with one of its values, or the whole body,
    replaced by NaN, ±Infinity or 1e400, sent as raw JSON."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    headers = team_headers("fuzz") | {"Content-Type": "application/json"}
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if op.body and any(body.media_type == "application/json" for body in op.body)]
    assert operations

    for operation in operations:

        @given(case=operation.as_strategy(media_type="application/json"), word=NON_FINITE, data=st.data())
        @settings(max_examples=EXAMPLES_PER_OPERATION * 4, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case, word, data):
            place = data.draw(st.sampled_from(_places(case.body)))
            body = json.dumps(_replaced(case.body, place, MARK)).replace(json.dumps(MARK), word)
            response = client.request(case.method, case.formatted_path, content=body, headers=headers)
            assert response.status_code < 500, (case.method, case.formatted_path, body, response.text[:500])

        no_server_error()


# ------------------------------------------------------------------------------------------------ dashboard

# What a form field or query parameter may hold: any text (NUL and astral characters included), numbers far out of
# range or not numbers at all, the values the forms expect, and long strings (a form's past the body limit; a
# query's up to what a client sends in a URL).
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 2**31, 2**63, 10**20])).map(str)


def values(longest: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        NUMBERS,
        st.sampled_from(["", " ", "1e309", "nan", "-inf", "0x10", "W4KV4", "W4", "builtin", "dataset", "file",
                         "stories260k", "tinystories", "default", "queued", "succeeded", "wkvq_", "wkvq_a_b", "\x00"]),
        st.integers(1_000, longest).map(lambda n: "é" * n))


VALUES, QUERY_VALUES = values(12_000), values(2_000)
JOB_FORM_FIELDS = [name for name in JobForm.model_fields if name != "file"]
VALID_JOB_FORM = {"model": "stories260k", "preset": "W4KV4", "group_size": "-1", "nsamples": "4", "seqlen": "64",
                  "epochs": "1", "crr_k": "2", "seed": "0", "gpu_class": "default", "calib_source": "builtin",
                  "builtin_name": "tinystories"}
# a valid form with some fields changed and some left out, so that most posts get past the first check
JOB_FORMS = st.builds(lambda changed, dropped: {k: v for k, v in (VALID_JOB_FORM | changed).items()
                                                 if k not in dropped},
                      st.dictionaries(st.sampled_from(JOB_FORM_FIELDS), VALUES, max_size=3),
                      st.sets(st.sampled_from(JOB_FORM_FIELDS), max_size=2))
FUZZED_POSTS = {"/dashboard/signin", "/dashboard/logout", "/dashboard/jobs/new", "/dashboard/jobs/{job_id}/cancel",
                "/dashboard/jobs/{job_id}/retry", "/dashboard/jobs/{job_id}/delete"}
UPLOADS = st.none() | st.tuples(st.text(max_size=20), st.binary(max_size=3_000))


def test_no_dashboard_form_or_page_answers_5xx(service, team_headers):
    """Every dashboard POST with generated form fields (any may be missing), every page with generated query
    parameters; job routes with generated ids, the id of a real job of the team, and one of another team's."""
    with TestClient(create_app(service), base_url=DASHBOARD_ORIGIN, follow_redirects=False) as web:
        key = team_key(service, "fuzz")
        own = web.post("/v1/jobs", json=TINY_JOB, headers={"Authorization": f"Bearer {key}"}).json()["id"]
        other = web.post("/v1/jobs", json=TINY_JOB, headers=team_headers("other")).json()["id"]
        job_ids = st.sampled_from([own, other]) | st.text(max_size=40)

        def new_session() -> str:
            with service.session() as session:
                return start_session(session, key)

        token = [new_session()]

        def call(method: str, path: str, **kwargs: Any) -> None:
            web.cookies.clear()  # signed in for every request, whatever sign-in or logout did to the jar
            web.cookies.set(COOKIE, token[0])
            headers = {"Origin": DASHBOARD_ORIGIN} if method == "POST" else {}
            response = web.request(method, path, headers=headers, **kwargs)
            assert response.status_code < 500, (method, path, kwargs, response.text[:500])
            if path == "/dashboard/logout":  # it ended the session
                token[0] = new_session()

        @FUZZ
        @given(form=st.dictionaries(st.sampled_from(["api_key", "next"]), VALUES))
        def signin(form: dict[str, str]) -> None:
            call("POST", "/dashboard/signin", data=form)

        @FUZZ
        @given(form=JOB_FORMS, upload=UPLOADS)
        def new_job(form: dict[str, str], upload: tuple[str, bytes] | None) -> None:
            call("POST", "/dashboard/jobs/new", data=form, files={"file": upload} if upload else None)

        @FUZZ
        @given(job_id=job_ids, action=st.sampled_from(["cancel", "retry"]), form=st.dictionaries(VALUES, VALUES))
        def job_action(job_id: str, action: str, form: dict[str, str]) -> None:
            call("POST", f"/dashboard/jobs/{quote(job_id, safe='')}/{action}", data=form)

        @FUZZ
        @given(form=st.dictionaries(VALUES, VALUES, max_size=3))
        def logout(form: dict[str, str]) -> None:
            call("POST", "/dashboard/logout", data=form)

        @FUZZ
        @given(params=st.fixed_dictionaries({}, optional={"status": QUERY_VALUES, "page": NUMBERS | QUERY_VALUES,
                                                          "size": NUMBERS | QUERY_VALUES}))
        def jobs_page(params: dict[str, str]) -> None:
            call("GET", "/dashboard/jobs", params=params)

        @FUZZ
        @given(job_id=job_ids, tail=st.sampled_from(["", "/fragment"]),
               params=st.dictionaries(QUERY_VALUES, QUERY_VALUES, max_size=2))
        def job_page(job_id: str, tail: str, params: dict[str, str]) -> None:
            call("GET", f"/dashboard/jobs/{quote(job_id, safe='')}{tail}", params=params)

        @FUZZ
        @given(path=st.sampled_from(["/dashboard/queue", "/dashboard/jobs/new", "/dashboard/signin"]),
               params=st.dictionaries(st.sampled_from(["next", "page"]), QUERY_VALUES))
        def other_pages(path: str, params: dict[str, str]) -> None:
            call("GET", path, params=params)

        @FUZZ
        @given(job_id=job_ids, form=st.dictionaries(VALUES, VALUES, max_size=3))
        def delete_job(job_id: str, form: dict[str, str]) -> None:  # last: the team's job is gone once it passed
            call("POST", f"/dashboard/jobs/{quote(job_id, safe='')}/delete", data=form)

        for fuzz in (signin, new_job, job_action, logout, jobs_page, job_page, other_pages, delete_job):
            fuzz()
    posts = {route.path for route in dashboard_router.routes if "POST" in getattr(route, "methods", ())}
    assert posts == FUZZED_POSTS, "a dashboard form the fuzzer does not post"

"""Schemathesis against the app's own OpenAPI schema (in-process ASGI, authenticated): no input gives a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.main import create_app
from tests.conftest import fresh_pg_database

from .conftest import TINY_JOB

EXAMPLES_PER_OPERATION = 12


@pytest.fixture
def db_url():
    with fresh_pg_database() as url:
        yield url


def test_no_operation_answers_5xx(service, client, team_headers):
    """Every operation with generated inputs; operations on a job run twice: with generated ids and with the id
    of a real (ended) job of the caller's team, so the generated inputs reach past the 404."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(service))
    headers = team_headers("fuzz")
    job_id = client.post("/v1/jobs", json=TINY_JOB, headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation, real_job in [(op, False) for op in operations] + [
            (op, True) for op in operations if "{job_id}" in op.path]:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            if real_job:
                case.path_parameters["job_id"] = job_id
            response = case.call(headers=headers)
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])

        no_server_error()

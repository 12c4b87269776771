"""Schemathesis against the live embedded server, on SQLite and on PostgreSQL: every operation in the served
OpenAPI document gets ``API_CASES`` generated requests over real HTTP (``make fuzz``: 1,000).

Counted, per backend: cases sent, 5xx answers, and schema violations (a status code, content type, header or
body the document does not declare). Every case runs (a failure is recorded, not raised, so the figures cover
the whole budget); the test fails at the end if any case failed, listing the first few per operation.
``positive_data_acceptance`` is left out as in tests/service/test_schemathesis.py: a schema-valid body may
name an id that does not exist, and 422/404 is the documented answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.result import Ok

from tests.conftest import API_KEYS, UvicornThread, make_settings, pg_database
from tests.fuzz.budget import API_CASES, FUZZING, target

AUTH = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
SHOWN_PER_OPERATION = 3


@contextlib.contextmanager
def served(data_dir: Path, backend: str) -> Iterator[str]:
    from alignd_server.embedded import create_app

    with contextlib.ExitStack() as stack:
        overrides: dict[str, Any] = {}
        if backend == "postgresql":
            overrides["database_url"] = stack.enter_context(pg_database())
        server = stack.enter_context(UvicornThread(create_app(make_settings(data_dir, **overrides))))
        yield server.base_url


def fuzz_operation(operation: Any, base_url: str, session: requests.Session, name: str) -> list[str]:
    figures = target(name)
    failures: list[str] = []

    @given(case=operation.as_strategy())
    @settings(
        max_examples=API_CASES,
        deadline=None,
        derandomize=not FUZZING,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        with figures.input():
            response = case.call(base_url=base_url, session=session, headers=AUTH, timeout=60)
        if response.status_code >= 500:
            figures.server_errors += 1
        try:
            case.validate_response(response, excluded_checks=[positive_data_acceptance], headers=AUTH)
        except Exception as exc:  # a check failed: count it and keep going through the budget
            if response.status_code < 500:
                figures.schema_violations += 1
            if len(failures) < SHOWN_PER_OPERATION:
                failures.append(f"{operation.label} -> {response.status_code}: {str(exc)[:600]}")

    run()
    return failures


@pytest.mark.fuzz
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_api_conforms_on_both_backends(tmp_path: Path, backend: str) -> None:
    name = f"API schemathesis ({backend})"
    failures: list[str] = []
    with served(tmp_path / "alignd", backend) as base_url, requests.Session() as session:
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        operations = 0
        short: list[str] = []  # operations whose every distinct input Hypothesis ran before the budget
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), (
                f"the served document has an operation schemathesis cannot read: {result}"
            )
            operation = result.ok()
            operations += 1
            before = target(name).inputs
            failures += fuzz_operation(operation, base_url, session, name)
            cases = target(name).inputs - before
            if cases < API_CASES:
                short.append(f"{operation.label} {cases}")
    figures = target(name)
    figures.notes.append(
        f"{name}: {operations} operations, {API_CASES} cases asked of each; "
        + (
            f"{len(short)} ran out of distinct inputs first (Hypothesis stops when it has tried every one: "
            f"operations with few or no parameters): {'; '.join(short)}"
            if short
            else "every operation ran them all"
        )
    )
    assert operations >= 15
    assert not failures, "\n\n".join(failures)

"""Property-based run of the live embedded server against its own OpenAPI document (bounded examples).

Schemathesis generates requests for every operation from openapi.json, sends them over real HTTP, and
checks: no 5xx, status codes and content types the document declares, bodies that match the schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.conftest import API_KEYS, UvicornThread, make_settings

AUTH = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from alignd_server.embedded import create_app

    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "alignd"
    with UvicornThread(create_app(make_settings(data_dir))) as server:
        yield server.base_url


def test_api_conforms_to_its_schema(fuzz_server: str) -> None:
    # Operations are driven one by one with Hypothesis (schemathesis' pytest plugin does not load under
    # this pytest version); each gets the same bounded, derandomised budget.
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            # positive_data_acceptance is left out on purpose: a schema-valid body can still name an id that
            # does not exist or carry files that are not a model, and 422 is the documented answer.
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 15
    assert not failures, "\n\n".join(failures)

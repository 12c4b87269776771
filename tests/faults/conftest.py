"""Fixtures of the fault suite: the plan (ALIGND_FAULTS_* counts), the results collector, the stacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.faults.chaos import FaultPlan
from tests.faults.report import FaultResults
from tests.faults.services import FaultStack, fault_stack


@pytest.fixture(scope="session")
def fault_plan() -> FaultPlan:
    return FaultPlan.from_env()


@pytest.fixture(scope="session")
def fault_results() -> Iterator[FaultResults]:
    results = FaultResults.from_env()
    yield results
    written = results.write()
    if written is not None:
        print(f"\n[faults] wrote {written[0]} and {written[1]}")


@pytest.fixture
def kill_stack(
    tmp_path: Path, pg_url: str, redis_server: RedisServer, moto_s3: str, aws_env: dict[str, str]
) -> Iterator[FaultStack]:
    """Two workers on a fresh database of the shared PostgreSQL, a private Redis, moto behind a proxy."""
    with fault_stack(
        tmp_path, database_url=pg_url, redis=redis_server, moto_endpoint=moto_s3, aws_env=aws_env
    ) as stack:
        yield stack

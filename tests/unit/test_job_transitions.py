"""The job lifecycle: ``ALLOWED_TRANSITIONS`` is enforced by ``transition`` and by the compare-and-set updates
``status_change`` builds, which every status write in the service and the runner goes through."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from service.core.ids import now
from service.core.jobs import TERMINAL_STATUSES, IllegalTransition, JobStatus, transition
from service.db.jobs import status_change
from service.db.session import make_engine, migrate, session_scope
from service.db.tables import JobRow

Q, R, S, F, C, P = (
    JobStatus.queued,
    JobStatus.running,
    JobStatus.succeeded,
    JobStatus.failed,
    JobStatus.cancelled,
    JobStatus.paused,
)


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATUSES))
@pytest.mark.parametrize("new", list(JobStatus))
def test_a_finished_job_never_moves_again(terminal: JobStatus, new: JobStatus) -> None:
    with pytest.raises(IllegalTransition, match=f"from '{terminal.value}' to '{new.value}'"):
        transition(terminal, new)


def test_a_queued_job_cannot_finish_successfully_without_running() -> None:
    with pytest.raises(IllegalTransition):
        transition(Q, S)


@pytest.mark.parametrize("status", [Q, R, P])
def test_a_status_is_never_written_over_itself(status: JobStatus) -> None:
    # Queued -> queued would reset a lease nobody took; running -> running would steal a live one.
    with pytest.raises(IllegalTransition):
        transition(status, status)


def test_unknown_current_status_is_refused() -> None:
    with pytest.raises(ValueError):
        transition("suspended", R)


@pytest.mark.parametrize(
    "lifecycle",
    [
        [Q, R, S],  # the common case
        [Q, R, Q, R, F],  # a dead worker's job queued again by the reconciler, then failing
        [Q, C],  # cancelled before a worker took it
        [Q, R, C],  # cancelled while running
        [Q, F],  # failed before it ran (its inputs are gone)
        [Q, R, P, Q, R, S],  # paused while running, resumed, finished
        [Q, P, Q, R, S],  # paused before a worker took it
        [Q, R, P, C],  # cancelled while paused
    ],
)
def test_legitimate_lifecycles_pass(lifecycle: list[JobStatus]) -> None:
    for current, new in pairwise(lifecycle):
        assert transition(current.value, new) is new  # the row stores the value; both forms are accepted


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def _add_job(engine: Engine, status: JobStatus) -> str:
    with session_scope(engine) as session:
        session.add(
            JobRow(
                id="job_1", tenant="t", method="sft", base_model="m", status=status.value, created_at=now()
            )
        )
    return "job_1"


def _status(engine: Engine, job_id: str) -> str:
    with session_scope(engine) as session:
        return session.exec(select(JobRow.status).where(JobRow.id == job_id)).one()


def test_status_change_moves_a_real_row_through_its_lifecycle(engine: Engine) -> None:
    job_id = _add_job(engine, Q)
    for current, new in ((Q, R), (R, Q), (Q, R), (R, S)):
        with session_scope(engine) as session:
            assert session.execute(status_change(job_id, current, new)).rowcount == 1  # type: ignore[attr-defined]
        assert _status(engine, job_id) == new.value


@pytest.mark.parametrize("new", [R, S, F])
def test_a_paused_job_only_resumes_to_the_queue_or_is_cancelled(new: JobStatus) -> None:
    # A worker never takes a paused job (acquire asks for `queued`), and it cannot end without running.
    with pytest.raises(IllegalTransition):
        transition(P, new)


def test_status_change_refuses_an_illegal_move_before_touching_the_row(engine: Engine) -> None:
    job_id = _add_job(engine, C)
    with pytest.raises(IllegalTransition):
        status_change(job_id, C, R)
    assert _status(engine, job_id) == C.value


def test_status_change_leaves_a_row_that_moved_on(engine: Engine) -> None:
    # A legal move asked of a row whose status is no longer `current` (a cancel won the race) changes nothing.
    job_id = _add_job(engine, C)
    with session_scope(engine) as session:
        assert session.execute(status_change(job_id, Q, R)).rowcount == 0  # type: ignore[attr-defined]
    assert _status(engine, job_id) == C.value

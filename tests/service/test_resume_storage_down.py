"""A new attempt that finds the S3 endpoint down must not start the job over.

Found by the fault suite (tests/faults/test_outages.py): the endpoint cut during a job's uploads, the next
attempt could not download its checkpoint, took that for a corrupt checkpoint, fell back to "from scratch"
and deleted the job's checkpoints: training restarted at step 0. Real moto behind a TCP proxy that is cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from tests.conftest import TcpProxy, make_bucket


@pytest.mark.usefixtures("aws_env")
def test_unreachable_store_ends_the_attempt_and_keeps_the_checkpoints(tmp_path: Path, moto_s3: str) -> None:
    from contract.protocol import CHECKPOINT_META_FILE
    from service.core.ids import now
    from service.db.session import make_engine, migrate, session_scope
    from service.db.tables import ArtifactRow, JobRow
    from service.storage import StorageUnavailable, open_store
    from workers.inputs import InputCache
    from workers.lease import acquire, fenced_job
    from workers.outputs import store_checkpoint
    from workers.resume import start_point

    proxy = TcpProxy(int(moto_s3.rsplit(":", 1)[1])).start()
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    store = open_store(f"s3://{make_bucket(moto_s3)}/x", s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    with session_scope(engine) as session:
        session.add(JobRow(id="job_resume", tenant="t", method="sft", base_model="m", created_at=now()))
    lease = acquire(engine, "job_resume", owner="w", lease_seconds=60)
    assert lease is not None
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / CHECKPOINT_META_FILE).write_text('{"stage": "sft", "step": 3}')
    store_checkpoint(
        engine, store, lease, {"type": "checkpoint", "path": str(folder), "stage": "sft", "step": 3}
    )

    def checkpoint_rows() -> int:
        with session_scope(engine) as session:
            return len(session.exec(select(ArtifactRow).where(ArtifactRow.kind == "checkpoint")).all())

    cache = InputCache(tmp_path / "cache")
    job = fenced_job(engine, lease)
    proxy.stop()
    try:
        with pytest.raises(StorageUnavailable):
            start_point(engine, store, cache, lease, job, tmp_path / "attempt-2", resume=True)
        assert checkpoint_rows() == 1  # kept for the attempt that comes once the store is back
    finally:
        proxy.start()
    resume_from, _ = start_point(engine, store, cache, lease, job, tmp_path / "attempt-3", resume=True)
    assert resume_from is not None and (resume_from.stage, resume_from.step) == ("sft", 3)
    proxy.stop()
    engine.dispose()

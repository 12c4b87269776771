"""What an attempt leaves behind, stored under its lease: artifacts, checkpoints, generated datasets, chat
completions.

Objects go to storage first and their rows second (fenced by the lease); a writer fenced out between the two
deletes its own object. Checkpoints go the other way round, row and then object. A worker killed between two
steps leaves an object no row points to; the orphan sweep deletes those while it holds the job's lease.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract.evaluation import EVAL_ARTIFACT_KIND, EvaluationResult
from service.core.errors import AlignError
from service.core.ids import new_id, now
from service.db.artifacts import sweep_orphan_objects
from service.db.datasets import add_dataset_file
from service.db.session import session_scope
from service.db.tables import ArtifactRow, JobEventRow, OpenAIChatCompletionRow
from service.storage import ArtifactStore, StorageUnavailable
from service.storage.keys import artifact_key
from workers.lease import Lease, LeaseLost, add_event, fenced

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2  # newest checkpoints kept in storage per job; older ones are deleted
# How long one upload waits for an unreachable store before the attempt ends (a later one then resumes from
# the newest checkpoint, redoing the work since).
UPLOAD_PATIENCE_SECONDS = 120.0


def pack_folder(folder: Path, dest: Path) -> tuple[int, str]:
    """Write ``folder``'s files at the root of a .tar.gz; return (size, sha256)."""
    with tarfile.open(dest, "w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    digest = hashlib.sha256()
    with open(dest, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return dest.stat().st_size, digest.hexdigest()


def refused_artifact(message: dict[str, Any]) -> tuple[str, str] | None:
    """The error to fail the job with when an artifact message breaks the protocol, None when it holds.

    An ``eval`` artifact's metadata carries the evaluation that ``GET /v1/jobs/{id}/evaluation`` serves, so
    it is checked against its schema before it is stored rather than failing every later read."""
    if message.get("kind") != EVAL_ARTIFACT_KIND:
        return None
    try:
        EvaluationResult.model_validate((message.get("metadata") or {}).get("evaluation"))
    except ValidationError as exc:
        return ("invalid_output", f"The eval artifact's evaluation does not match its schema: {exc}")
    return None


def put_when_reachable(
    store: ArtifactStore,
    key: str,
    path: Path,
    lease: Lease,
    *,
    patience: float = UPLOAD_PATIENCE_SECONDS,
    first_wait: float = 0.5,
    max_wait: float = 10.0,
) -> None:
    """``store.put_file``, retried with backoff while the store is unreachable, for up to ``patience`` s.

    The file stays on disk and the lease keeper holds the lease meanwhile, so a short outage costs a pause
    rather than the attempt (whose successor would redo the training since the newest checkpoint, and spend
    one of the job's tries). A lost lease or a cancel ends the wait at once; past ``patience`` the
    StorageUnavailable ends the attempt as before.
    """
    deadline = time.monotonic() + patience
    wait = first_wait
    while True:
        try:
            store.put_file(key, path)
            return
        except StorageUnavailable as exc:
            if lease.lost.is_set() or lease.cancel_requested.is_set() or time.monotonic() + wait > deadline:
                raise
            log.warning("store unreachable uploading %s (%s); retrying in %.1f s", key, exc, wait)
        time.sleep(wait)
        wait = min(wait * 2, max_wait)


def store_artifact(engine: Engine, store: ArtifactStore, lease: Lease, message: dict[str, Any]) -> None:
    """Pack the folder an ``artifact`` (or ``checkpoint``) message names, upload it, then add its row."""
    folder = Path(str(message["path"]))
    artifact_id = new_id("artifact")
    archive = folder.parent / f"{artifact_id}.tar.gz"
    size, sha256 = pack_folder(folder, archive)
    key = artifact_key(lease.job_id, artifact_id)
    put_when_reachable(store, key, archive, lease)
    archive.unlink()
    try:
        with session_scope(engine) as session:
            job = fenced(session, lease)
            session.add(
                ArtifactRow(
                    id=artifact_id,
                    tenant=job.tenant,
                    job_id=job.id,
                    stage=message.get("stage") or job.stage,
                    kind=str(message["kind"]),
                    size_bytes=size,
                    sha256=sha256,
                    storage_key=key,
                    meta=dict(message.get("metadata") or {}),
                    created_at=now(),
                )
            )
            session.add(
                JobEventRow(
                    job_id=job.id,
                    created_at=now(),
                    level="info",
                    stage=message.get("stage") or job.stage,
                    message=f"Stored {message['kind']} artifact {artifact_id} ({size} bytes)"
                    + (f" at step {message.get('step')}." if message["kind"] == "checkpoint" else "."),
                )
            )
    except LeaseLost:
        store.delete(key)  # not ours to publish any more
        raise


def store_checkpoint(engine: Engine, store: ArtifactStore, lease: Lease, message: dict[str, Any]) -> None:
    folder = Path(str(message["path"]))
    metadata = {
        "stage": message.get("stage"),
        "step": int(message.get("step", 0)),
        "stage_complete": bool(message.get("stage_complete", False)),
    }
    store_artifact(engine, store, lease, {**message, "kind": "checkpoint", "metadata": metadata})
    # Stored: the child never reads the local folder again, and a resume fetches from storage.
    shutil.rmtree(folder, ignore_errors=True)
    _prune_checkpoints(engine, store, lease)


def _prune_checkpoints(engine: Engine, store: ArtifactStore, lease: Lease) -> None:
    with session_scope(engine) as session:
        fenced(session, lease)
        rows = session.exec(
            select(ArtifactRow)
            .where(ArtifactRow.job_id == lease.job_id, ArtifactRow.kind == "checkpoint")
            .order_by(col(ArtifactRow.seq).desc())
        ).all()
        stale = list(rows[CHECKPOINTS_KEPT:])
        keys = [row.storage_key for row in stale]
        for row in stale:
            session.delete(row)
    delete_objects(store, keys)


def delete_checkpoint_rows(session: Any, job_id: str) -> list[str]:
    """Delete the job's checkpoint rows in ``session``; returns their storage keys (delete those after commit)."""
    rows = session.exec(
        select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.kind == "checkpoint")
    ).all()
    for row in rows:
        session.delete(row)
    return [row.storage_key for row in rows]


def sweep_orphans(engine: Engine, store: ArtifactStore, lease: Lease) -> None:
    """Delete the job's objects that no row references, holding the job's row (and so its lease)."""
    try:
        with session_scope(engine) as session:
            # Locked and fenced for the whole sweep: a lease that lapsed cannot pass to a new worker
            # whose fresh upload, not yet given its row, the sweep would take for an orphan.
            fenced(session, lease)
            sweep_orphan_objects(session, store, lease.job_id)
    except LeaseLost:
        raise
    except Exception as exc:  # an orphaned object costs space, not correctness: never fail a job on it
        log.warning("could not sweep orphan artifact objects of %s: %s", lease.job_id, exc)


def sweep_orphans_when_reachable(
    engine: Engine,
    store: ArtifactStore,
    lease: Lease,
    *,
    give_up: Callable[[], bool],
    first_wait: float = 0.5,
    max_wait: float = 10.0,
) -> bool:
    """:func:`sweep_orphans` for a job about to succeed, retried while the store is unreachable.

    Nothing sweeps a finished job's objects without a row later, so an earlier attempt's leftovers that the
    store could not delete would stay for good. The lease keeper holds the
    lease meanwhile. Returns False when ``give_up()`` (worker stopping, lease lost) ended the wait first, or
    the store failed otherwise; the job then succeeds with the objects left, as before this retry.
    """
    wait = first_wait
    while True:
        try:
            with session_scope(engine) as session:
                fenced(session, lease)
                sweep_orphan_objects(session, store, lease.job_id)
            return True
        except StorageUnavailable as exc:
            if give_up():
                log.warning("could not sweep orphan artifact objects of %s: %s", lease.job_id, exc)
                return False
            log.warning("store unreachable sweeping %s before it succeeds (%s); retrying", lease.job_id, exc)
        except LeaseLost:
            raise
        except Exception as exc:  # an orphaned object costs space, not correctness: never fail a job on it
            log.warning("could not sweep orphan artifact objects of %s: %s", lease.job_id, exc)
            return False
        time.sleep(wait)
        wait = min(wait * 2, max_wait)


def delete_objects(store: ArtifactStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception as exc:  # an orphaned object costs space, not correctness
            log.warning("could not delete artifact object %s: %s", key, exc)


def store_chat(engine: Engine, lease: Lease, message: dict[str, Any]) -> None:
    """A chat job's completion so far (a ``chat`` line): its choices and usage replace the row's, under the
    lease. Whole texts, not deltas, so one row per job; the facade's request that made the row reads it."""
    choices = [
        {
            "index": int(choice.get("index", index)),
            "text": str(choice.get("text", "")),
            "finish_reason": choice.get("finish_reason"),
        }
        for index, choice in enumerate(message.get("choices") or [])
        if isinstance(choice, dict)
    ]
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else None
    with session_scope(engine) as session:
        fenced(session, lease)
        row = session.exec(
            select(OpenAIChatCompletionRow).where(OpenAIChatCompletionRow.id == lease.job_id)
        ).first()
        if row is None:  # not a facade request's job (chat jobs are made only there): nobody to answer
            log.warning("chat output of %s has no chat completion row; dropped", lease.job_id)
            return
        row.choices, row.usage = choices, usage  # new values: the JSON columns are saved on assignment
        session.add(row)


def store_dataset(
    engine: Engine, store: ArtifactStore, lease: Lease, message: dict[str, Any], *, max_bytes: int
) -> tuple[str, str] | None:
    """A dataset the child wrote (``generate``'s candidates): checked with the upload rules, then stored.

    Returns the error to fail the job with when the dataset is refused, None when it was stored.
    """
    kind = str(message.get("kind"))
    try:
        with session_scope(engine) as session:
            job = fenced(session, lease)
            tenant, job_round, stage = job.tenant, job.round, message.get("stage") or job.stage
        with Session(engine, expire_on_commit=False) as session:
            row = add_dataset_file(
                session,
                store,
                Path(str(message["path"])),
                tenant=tenant,
                kind=kind,
                name=str(message.get("name") or f"{kind} from {lease.job_id}"),
                max_bytes=max_bytes,
                job_id=lease.job_id,
                round=job_round,
            )
    except (AlignError, OSError, KeyError) as exc:
        text = exc.message if isinstance(exc, AlignError) else str(exc)
        details = getattr(exc, "details", [])[:3]
        return ("invalid_output", f"The generated {kind} dataset was refused: {text} {details}")
    add_event(
        engine,
        lease,
        f"Stored {kind} dataset {row.id} ({row.num_records} records, {row.size_bytes} bytes).",
        stage=stage,
    )
    return None

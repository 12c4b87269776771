"""A feedback set's jobs: scoring its items with a reward model, refreshing that model, and AI judges.

The API never loads a model: the set submits ordinary jobs (methods ``score``, ``reward_model``, ``judge``)
that a worker's training child runs (``workers/training/feedback_jobs.py``), and reads their results back
from the artifacts' metadata when it next looks at the set (:func:`sync`, called by the set's routes).

``state`` on the set row records what is in flight and what has been read, and every change of it is a
compare-and-set on ``version``: two requests that look at the set at once never both submit a refresh or
both write a judge's labels. ``events`` is the set's log (newest last, at most MAX_EVENTS).

The refresh cadence (``refresh_every_labels: N``, uncertainty ordering): once N labels by people have
arrived since the last refresh, the labels so far are exported (a ``ranking`` dataset linked to the set), a
``reward_model`` job continues the current reward model on them (``refresh_from: "initial"``: the set's own
reward model; the base model, LoRA settings, seed and hyperparameters of the job that made it, or the set's
``refresh_hyperparameters``), and when it succeeds a
``score`` job re-scores every item with the new model. Until the new scores are read, /next orders by the
previous ones.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from contract.hyperparameters import (
    ITEM_SCORES_KIND,
    JUDGE_LABELS_KIND,
    JudgeHyperparameters,
    ScoreHyperparameters,
)
from contract.methods import Method
from service.api.deps import AppContext
from service.api.job_submission import enqueue, new_job_row
from service.api.schemas import JobCreate, JobDatasets, LoraCreate
from service.core import feedback as fb
from service.core import feedback_sets as rules
from service.core.errors import AlignError, ConflictError, ValidationFailed
from service.core.ids import new_id, now
from service.core.jobs import JobStatus
from service.db import feedback_sets
from service.db.datasets import add_dataset_file
from service.db.repository import find_owned
from service.db.tables import (
    ArtifactRow,
    DatasetRow,
    FeedbackLabelRow,
    FeedbackSetRow,
    JobEventRow,
    JobRow,
    ModelRow,
)
from service.staging import open_staging, release_staging

log = logging.getLogger(__name__)

MAX_EVENTS = 200


def _refused(message: str, code: str, field: str) -> ValidationFailed:
    return ValidationFailed(message, code=code, details=[{"field": field, "code": code, "message": message}])


def reward_model_artifact(session: Session, tenant: str, artifact_id: str) -> ArtifactRow:
    """The tenant's ``reward_model`` artifact; 422 ``unknown_artifact`` (another tenant's too) or
    ``wrong_artifact_kind`` otherwise."""
    artifact = find_owned(session, ArtifactRow, artifact_id, tenant)
    if artifact is None:
        raise _refused(f"No artifact '{artifact_id}'.", "unknown_artifact", "reward_model")
    if artifact.kind != "reward_model":
        raise _refused(
            f"Artifact '{artifact_id}' is a '{artifact.kind}', expected 'reward_model'.",
            "wrong_artifact_kind",
            "reward_model",
        )
    return artifact


def _producer(session: Session, artifact: ArtifactRow) -> JobRow:
    job = session.exec(select(JobRow).where(JobRow.id == artifact.job_id)).first()
    if job is None:  # artifacts outlive nothing: a job's rows are deleted with it
        raise _refused(f"The job that made {artifact.id} is gone.", "unknown_artifact", "reward_model")
    return job


def _queued_job(fset: FeedbackSetRow, *, method: Method, base_model: str, **fields: Any) -> JobRow:
    job = JobRow(
        id=new_id("job"),
        tenant=fset.tenant,
        name=f"{method.value}: {fset.name}"[:256],
        method=method.value,
        status=JobStatus.queued.value,
        base_model=base_model,
        datasets={"candidates": fset.candidates},
        round=fset.round,
        lora={},
        seed=0,
        created_at=now(),
        **fields,
    )
    return job


def _queued_event(session: Session, job: JobRow, why: str) -> None:
    session.add(
        JobEventRow(job_id=job.id, created_at=job.created_at, level="info", message=f"Job queued ({why}).")
    )


def _items_source(ctx: AppContext, session: Session, fset: FeedbackSetRow) -> None:
    """Point ``fset.candidates`` at a dataset holding its items, line for item: the original candidates
    file while it exists, else the items written out again (a set outlives its candidates dataset)."""
    if session.exec(select(DatasetRow).where(DatasetRow.id == fset.candidates)).first() is not None:
        return
    import json

    staging = open_staging(ctx.settings.data_dir, "feedback-items")
    try:
        path = staging / "candidates.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for item in feedback_sets.items(session, fset.id):
                out.write(json.dumps({"prompt": item.prompt, "responses": item.responses}) + "\n")
        row = add_dataset_file(
            session,
            ctx.store,
            path,
            tenant=fset.tenant,
            kind="candidates",
            name=f"{fset.name} (items)",
            max_bytes=ctx.settings.max_dataset_bytes,
            feedback_set_id=fset.id,
            round=fset.round,
        )
    finally:
        release_staging(staging)
    fset.candidates = row.id


def score_job(session: Session, fset: FeedbackSetRow, artifact: ArtifactRow, why: str) -> JobRow:
    """A ``score`` job of ``fset``'s items with the reward model ``artifact``, added to ``session``."""
    job = _queued_job(
        fset,
        method=Method.score,
        base_model=_producer(session, artifact).base_model,
        reward_model=artifact.id,
        hyperparameters=ScoreHyperparameters().model_dump(),
    )
    session.add(job)
    _queued_event(session, job, why)
    return job


def _event(fset: FeedbackSetRow, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"at": now(), "kind": kind, "message": message, **extra}


def save(session: Session, fset: FeedbackSetRow, state: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """Write ``state`` and append ``events`` if nobody else changed the set since it was read; commit. False
    (everything rolled back, the row re-read) when someone did."""
    log_entries = (list(fset.events or []) + events)[-MAX_EVENTS:]
    result = session.execute(
        update(FeedbackSetRow)
        .where(col(FeedbackSetRow.id) == fset.id, col(FeedbackSetRow.version) == fset.version)
        .values(state=state, events=log_entries, version=fset.version + 1, candidates=fset.candidates)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        session.refresh(fset)
        return False
    session.commit()
    session.refresh(fset)
    return True


def start_scoring(ctx: AppContext, session: Session, fset: FeedbackSetRow, artifact: ArtifactRow) -> None:
    """A new uncertainty-ordered set: score its items with its reward model (committed and queued)."""
    _items_source(ctx, session, fset)
    job = score_job(session, fset, artifact, f"feedback set {fset.id}: scoring its items")
    state = {**(fset.state or {}), "scoring": {"job": job.id, "stage": "score", "reward_model": artifact.id}}
    events = [
        _event(fset, "scoring", f"scoring {fset.num_items} items with reward model {artifact.id}", job=job.id)
    ]
    if save(session, fset, state, events):
        enqueue(ctx.queue, job)


# --- reading results back


def _artifact_of(session: Session, job_id: str, kind: str) -> ArtifactRow | None:
    return session.exec(
        select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.kind == kind)
    ).first()


def _read_scores(session: Session, fset: FeedbackSetRow, job: JobRow) -> tuple[int, float | None]:
    """Write the score job's rewards onto the items; (items scored, smallest margin)."""
    artifact = _artifact_of(session, job.id, ITEM_SCORES_KIND)
    rewards = (artifact.meta if artifact is not None else {}).get("rewards") or []
    scored, smallest = 0, None
    for item, values in zip(feedback_sets.items(session, fset.id), rewards, strict=False):
        if isinstance(values, list) and len(values) == len(item.responses):
            item.rewards = [float(v) for v in values]
            session.add(item)
            scored += 1
            margin = fb.uncertainty_margin(item.rewards)
            smallest = margin if smallest is None else min(smallest, margin)
    return scored, smallest


def _finish_scoring(
    ctx: AppContext, session: Session, fset: FeedbackSetRow, state: dict[str, Any], job: JobRow | None
) -> tuple[list[dict[str, Any]], list[JobRow]]:
    scoring = state.pop("scoring")
    if job is None or job.status != JobStatus.succeeded.value:
        why = "is gone" if job is None else f"ended {job.status}: {job.error_message or job.error_code}"
        return [
            _event(
                fset,
                "scoring_failed",
                f"{scoring['stage']} job {scoring['job']} {why}; /next keeps the scores it has",
                job=scoring["job"],
            )
        ], []
    if scoring["stage"] == "score":
        scored, smallest = _read_scores(session, fset, job)
        state.update(scored_by=scoring["reward_model"], scored_job=job.id)
        low = f"; smallest margin {smallest:.4g}" if smallest is not None else ""
        return [
            _event(
                fset,
                "scored",
                f"scored {scored} items with reward model {scoring['reward_model']}{low}",
                job=job.id,
                reward_model=scoring["reward_model"],
            )
        ], []
    trained = _artifact_of(session, job.id, "reward_model")
    if trained is None:
        return [
            _event(fset, "scoring_failed", f"reward_model job {job.id} left no reward model", job=job.id)
        ], []
    scorer = score_job(session, fset, trained, f"feedback set {fset.id}: re-scoring after a refresh")
    state["refreshes"] = int(state.get("refreshes", 0)) + 1
    state["scoring"] = {"job": scorer.id, "stage": "score", "reward_model": trained.id}
    message = (
        f"refresh {state['refreshes']}: reward_model job {job.id} continued {job.init_reward_model} on "
        f"{scoring.get('labels')} labels into {trained.id}; re-scoring the items"
    )
    return [_event(fset, "refreshed", message, job=scorer.id, reward_model=trained.id)], [scorer]


def _judge_labels(session: Session, fset: FeedbackSetRow, name: str, result: dict[str, Any]) -> int:
    """The judge's verdicts as labels of ``judge:<name>``: one pairwise label per consistent pair, a skip
    for an item without any (its two orders never agreed). Returns the labels written."""
    items = feedback_sets.items(session, fset.id)
    annotator = f"{fb.JUDGE_PREFIX}{name}"
    written = 0
    for entry in result.get("labels") or []:
        position = entry.get("position")
        if not isinstance(position, int) or not 0 <= position < len(items):
            continue
        item = items[position]
        pairs = [
            p
            for p in entry.get("pairs") or []
            if isinstance(p, list)
            and len(p) == 3
            and all(isinstance(i, int) and 0 <= i < len(item.response_ids) for i in p[:2])
            and p[0] != p[1]
            and p[2] in ("a", "b")
        ]
        payloads = [
            ("pairwise", {"a": item.response_ids[i], "b": item.response_ids[j], "winner": winner})
            for i, j, winner in pairs
        ] or [("skip", {})]
        for kind, payload in payloads:
            session.add(
                FeedbackLabelRow(
                    id=new_id("label"),
                    set_id=fset.id,
                    item_id=item.id,
                    annotator=annotator,
                    kind=kind,
                    payload=payload,
                    created_at=now(),
                )
            )
            written += int(kind != "skip")
    return written


def _finish_judge(
    session: Session, fset: FeedbackSetRow, name: str, judge: dict[str, Any], job: JobRow | None
) -> list[dict[str, Any]]:
    if job is None or job.status != JobStatus.succeeded.value:
        judge.update(status="failed", error=None if job is None else (job.error_message or job.error_code))
        return [
            _event(
                fset,
                "judge_failed",
                f"judge {name} (job {judge['job']}) failed: {judge['error']}",
                job=judge["job"],
            )
        ]
    artifact = _artifact_of(session, job.id, JUDGE_LABELS_KIND)
    result = artifact.meta if artifact is not None else {}
    written = _judge_labels(session, fset, name, result)
    judge.update(
        status="done",
        labels=written,
        **{
            k: result.get(k)
            for k in (
                "asked",
                "consistent",
                "inconsistent",
                "unparsed",
                "first_position_share",
                "verdict",
                "position_bias",
            )
        },
    )
    if result.get("verdict") == "logprobs":
        message = (
            f"judge {name}: {written} pairwise labels from {result.get('asked', 0)} pairs, each by the "
            f"difference of its two orders' log-odds (mean lean to the first position "
            f"{result.get('position_bias')})"
        )
    else:
        message = (
            f"judge {name}: {written} pairwise labels from {result.get('asked', 0)} pairs asked in both orders "
            f"({result.get('inconsistent', 0)} flipped with the order, {result.get('unparsed', 0)} "
            "unanswered: no label)"
        )
    return [_event(fset, "judged", message, job=job.id)]


def human_label_count(session: Session, set_id: str) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(FeedbackLabelRow)
            .where(
                FeedbackLabelRow.set_id == set_id,
                FeedbackLabelRow.kind != "skip",
                ~col(FeedbackLabelRow.annotator).startswith(fb.JUDGE_PREFIX),
            )
        ).one()
    )


def _refresh_due(fset: FeedbackSetRow, state: dict[str, Any], labels: int) -> bool:
    every = fset.refresh_every_labels
    return (
        fset.ordering == "uncertainty"
        and bool(every)
        and "scoring" not in state
        and labels - int(state.get("last_refresh_labels", 0)) >= (every or 0)
    )


def _refresh_request(
    session: Session, fset: FeedbackSetRow, state: dict[str, Any], dataset: str
) -> JobCreate:
    latest = state.get("scored_by") if state.get("refresh_from", "latest") == "latest" else None
    current = latest or fset.reward_model or ""
    artifact = session.exec(select(ArtifactRow).where(ArtifactRow.id == current)).first()
    if artifact is None:
        raise _refused(f"reward model {current} is gone", "unknown_artifact", "reward_model")
    made_by = _producer(session, artifact)
    hyperparameters = made_by.hyperparameters
    if made_by.method == Method.rlhf.value:
        hyperparameters = hyperparameters.get("reward_model") or {}
    return JobCreate(
        method=Method.reward_model,
        base_model=made_by.base_model,
        datasets=JobDatasets(preference=dataset),
        init_reward_model=artifact.id,
        lora=LoraCreate.model_validate(
            {k: made_by.lora[k] for k in ("r", "alpha", "dropout", "target_modules") if k in made_by.lora}
        ),
        hyperparameters=state.get("refresh_hyperparameters") or hyperparameters,
        seed=made_by.seed,
        round=fset.round,
        name=f"refresh: {fset.name}"[:256],
    )


def _export_labels(ctx: AppContext, session: Session, fset: FeedbackSetRow, labels: int) -> DatasetRow:
    items = feedback_sets.items(session, fset.id)
    ratings = rules.rate_items(items, rules.human_labels(feedback_sets.labels(session, fset.id)))
    kept = rules.export_selection(items, ratings, set_id=fset.id, min_labels=1, min_agreement=None)
    staging = open_staging(ctx.settings.data_dir, "refresh")
    try:
        path = staging / "ranking.jsonl"
        rules.write_ranking_file(path, kept)
        return add_dataset_file(
            session,
            ctx.store,
            path,
            tenant=fset.tenant,
            kind="ranking",
            name=f"{fset.name} (refresh at {labels} labels)"[:256],
            max_bytes=ctx.settings.max_dataset_bytes,
            feedback_set_id=fset.id,
            round=fset.round,
        )
    finally:
        release_staging(staging)


def _start_refresh(ctx: AppContext, session: Session, fset: FeedbackSetRow, labels: int) -> None:
    """Claim the refresh (compare-and-set), export the labels so far, and queue the reward_model job."""
    state = {**(fset.state or {}), "last_refresh_labels": labels}
    if not save(session, fset, state, []):
        return  # another request is refreshing
    try:
        dataset = _export_labels(ctx, session, fset, labels)
        job = new_job_row(ctx, session, fset.tenant, _refresh_request(session, fset, state, dataset.id))
    except AlignError as exc:
        session.rollback()
        save(
            session,
            fset,
            dict(fset.state or {}),
            [_event(fset, "refresh_failed", f"refresh at {labels} labels not started: {exc.message}")],
        )
        return
    state = {**(fset.state or {}), "scoring": {"job": job.id, "stage": "reward_model", "labels": labels}}
    message = f"refresh at {labels} labels: reward_model job {job.id} continues {job.init_reward_model} on {dataset.id}"
    if save(session, fset, state, [_event(fset, "refresh", message, job=job.id, labels=labels)]):
        enqueue(ctx.queue, job)


def sync(ctx: AppContext, session: Session, fset: FeedbackSetRow) -> None:
    """Read back the set's finished jobs (scores, a refreshed reward model, judges' labels) and start a due
    refresh. Cheap when nothing is in flight: one look at ``state``, one count of the labels."""
    state: dict[str, Any] = {**(fset.state or {})}
    state["judges"] = {name: dict(j) for name, j in (state.get("judges") or {}).items()}
    events: list[dict[str, Any]] = []
    queued: list[JobRow] = []
    scoring = state.get("scoring")
    if scoring is not None and scoring.get("job"):
        job = session.exec(select(JobRow).where(JobRow.id == scoring["job"])).first()
        if job is None or JobStatus(job.status).is_terminal:
            found, queued = _finish_scoring(ctx, session, fset, state, job)
            events += found
    for name, judge in state["judges"].items():
        if judge.get("status") == "running":
            job = session.exec(select(JobRow).where(JobRow.id == judge["job"])).first()
            if job is None or JobStatus(job.status).is_terminal:
                events += _finish_judge(session, fset, name, judge, job)
    if events:
        if not save(session, fset, state, events):
            return  # someone else read them back first
        for job in queued:
            enqueue(ctx.queue, job)
    labels = human_label_count(session, fset.id)
    if _refresh_due(fset, dict(fset.state or {}), labels):
        _start_refresh(ctx, session, fset, labels)


# --- judges


def judge_model(session: Session, tenant: str, model: str) -> tuple[str, str | None]:
    """(base model id, adapter artifact id or None) of a judge named by a model id or an adapter artifact."""
    if model.startswith("art_"):
        artifact = find_owned(session, ArtifactRow, model, tenant)
        if artifact is None:
            raise _refused(f"No artifact '{model}'.", "unknown_artifact", "model")
        if artifact.kind != "adapter":
            raise _refused(
                f"Artifact '{model}' is a '{artifact.kind}'; a judge is a causal LM: a model or an 'adapter'.",
                "wrong_artifact_kind",
                "model",
            )
        return _producer(session, artifact).base_model, artifact.id
    if find_owned(session, ModelRow, model, tenant) is None:
        raise _refused(f"No model '{model}'.", "unknown_model", "model")
    return model, None


def add_judge(
    ctx: AppContext,
    session: Session,
    fset: FeedbackSetRow,
    *,
    name: str,
    model: str,
    hyperparameters: dict[str, Any],
) -> None:
    """Queue a judge job labelling ``fset`` as ``judge:<name>`` (409 ``judge_exists`` for a taken name)."""
    judges = dict((fset.state or {}).get("judges") or {})
    if name in judges:
        raise ConflictError(f"Feedback set {fset.id} already has a judge '{name}'.", code="judge_exists")
    base, adapter = judge_model(session, fset.tenant, model)
    settings = JudgeHyperparameters.model_validate(
        {**hyperparameters, "name": name, "rubric": fset.guidelines or ""}
    )
    _items_source(ctx, session, fset)
    job = _queued_job(
        fset,
        method=Method.judge,
        base_model=base,
        init_adapter=adapter,
        hyperparameters=settings.model_dump(),
    )
    session.add(job)
    _queued_event(session, job, f"feedback set {fset.id}: judge {name}")
    judges[name] = {"model": model, "job": job.id, "status": "running"}
    state = {**(fset.state or {}), "judges": judges}
    if not save(
        session, fset, state, [_event(fset, "judge", f"judge {name} ({model}) labels the items", job=job.id)]
    ):
        raise ConflictError(f"Feedback set {fset.id} changed meanwhile; try again.", code="feedback_set_busy")
    enqueue(ctx.queue, job)

"""Tables. The job row is the single source of truth for a job's state; the queue only carries ids.

Every resource row carries ``tenant``; every query filters on it, so another tenant's id is simply not found.
``seq`` is an internal, monotonically increasing key used for stable cursor pagination (``?after=<id>``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, Text, false
from sqlmodel import Field, SQLModel


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    name: str = Field(max_length=256)
    architecture: str | None = Field(default=None, max_length=256)
    num_parameters: int = Field(default=0, sa_type=BigInteger)
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    status: str = Field(default="ready", max_length=32)
    files: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: int


class DatasetRow(SQLModel, table=True):
    __tablename__ = "datasets"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    name: str = Field(max_length=256)
    kind: str = Field(max_length=32)
    num_records: int = 0
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    sha256: str = Field(max_length=64)
    status: str = Field(default="ready", max_length=32)
    created_at: int
    # Where a dataset came from, when alignd made it: the job that generated it (``candidates``), the feedback
    # set it was exported from (``ranking``); and the feedback round it belongs to (optional, user-set).
    job_id: str | None = Field(default=None, index=True, max_length=64)
    feedback_set_id: str | None = Field(default=None, max_length=64)
    round: int | None = Field(default=None, index=True)


class JobRow(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_tenant_status", "tenant", "status"),)

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    name: str | None = Field(default=None, max_length=256)
    method: str = Field(max_length=32)
    status: str = Field(default="queued", index=True, max_length=32)
    stage: str | None = Field(default=None, max_length=32)
    base_model: str = Field(max_length=64)
    datasets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    init_adapter: str | None = Field(default=None, max_length=64)
    reward_model: str | None = Field(default=None, max_length=64)
    init_reward_model: str | None = Field(default=None, max_length=64)
    round: int | None = Field(default=None, index=True)
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    lora: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    seed: int = 0
    progress: float = 0.0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Why a job ended as it did when its status alone does not say (``stopped_by_monitor``: succeeded early).
    status_reason: str | None = Field(default=None, max_length=64)
    # The reward-hacking monitors that fired during PPO, as the child reported them (workers/lease.add_monitor).
    monitors: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    # Cancellation is a flag on the row, so it works whichever process runs the job.
    cancel_requested: bool = False
    # Pause, likewise: the runner stops the child at its next step boundary (a checkpoint first) and the job
    # becomes `paused`; a resume clears it.
    pause_requested: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    # Lease: the runner that owns the job, its fencing token, and when the lease lapses.
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_token: int = 0
    lease_expires_at: float | None = None
    attempts: int = 0


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "artifacts"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    job_id: str = Field(index=True, max_length=64)
    stage: str | None = Field(default=None, max_length=32)
    kind: str = Field(max_length=32)
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    sha256: str = Field(max_length=64)
    storage_key: str = Field(max_length=512)
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    created_at: int

    # The reconciler's look for a succeeded job's leftover checkpoints (service/reconciler.py).
    __table_args__ = (Index("ix_artifacts_kind_job_id", "kind", "job_id"),)


class JobEventRow(SQLModel, table=True):
    __tablename__ = "job_events"

    seq: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=64)
    created_at: int
    level: str = Field(default="info", max_length=16)
    stage: str | None = Field(default=None, max_length=32)
    message: str = Field(sa_column=Column(Text, nullable=False))


class JobMetricRow(SQLModel, table=True):
    __tablename__ = "job_metrics"
    __table_args__ = (Index("ix_job_metrics_job_seq", "job_id", "seq"),)

    seq: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(max_length=64)
    stage: str | None = Field(default=None, max_length=32)
    step: int
    name: str = Field(max_length=64)
    value: float
    created_at: int


class FeedbackSetRow(SQLModel, table=True):
    """A set of candidates put up for human labelling; its items are copied from the candidates dataset."""

    __tablename__ = "feedback_sets"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    name: str = Field(max_length=256)
    candidates: str = Field(max_length=64)
    annotations_per_item: int = 1
    num_items: int = 0
    round: int | None = Field(default=None)
    created_at: int
    # Which item /next serves first: "random" (least-labelled first) or "uncertainty" (smallest reward-model
    # margin first; service/core/feedback.py choose_item).
    ordering: str = Field(default="random", max_length=16)
    reward_model: str | None = Field(default=None, max_length=64)
    refresh_every_labels: int | None = None
    guidelines: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    gold_failure_threshold: float = 0.25
    gold_every: int = 5
    # "all" or "judge_reward_disagree": people get only the items where a judge and the reward model disagree.
    routing: str = Field(default="all", max_length=32)
    # The scoring/refresh/judge jobs and their results so far (service/core/feedback_jobs.py), and a bounded
    # log of what happened to the set; ``version`` is bumped by every write of ``state`` (compare-and-set).
    state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    events: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    version: int = 0


class FeedbackItemRow(SQLModel, table=True):
    """One prompt and its responses. Copied into the database (not read from the dataset file per request):
    /next and /ratings touch many items, and the set must outlive a deleted candidates dataset."""

    __tablename__ = "feedback_items"
    __table_args__ = (Index("ix_feedback_items_set_index", "set_id", "position"),)

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    set_id: str = Field(max_length=64)
    position: int
    prompt: Any = Field(sa_column=Column(JSON, nullable=False))
    responses: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    response_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The current reward model's reward per response (the score job's output), None until scored.
    rewards: list[float] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # A known answer (the candidates row's ``gold``: response indices best first): a gold item checks people.
    gold: list[int] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class FeedbackAssignmentRow(SQLModel, table=True):
    """An item handed to an annotator by /next. Unique per (item, annotator): nobody gets an item twice."""

    __tablename__ = "feedback_assignments"
    __table_args__ = (
        Index("ux_feedback_assignments_item_annotator", "item_id", "annotator", unique=True),
        Index("ix_feedback_assignments_set_annotator", "set_id", "annotator"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    set_id: str = Field(max_length=64)
    item_id: str = Field(max_length=64)
    annotator: str = Field(max_length=128)
    served_at: float
    done: bool = False
    # Why /next chose this item: "random", "overlap", "margin", "unscored" or "gold" (and the margin then).
    reason: str | None = Field(default=None, max_length=16)
    margin: float | None = None


class FeedbackLabelRow(SQLModel, table=True):
    """One label: a ranking, scores, a pairwise comparison, or a skip (``payload`` per ``kind``)."""

    __tablename__ = "feedback_labels"
    __table_args__ = (Index("ix_feedback_labels_set_seq", "set_id", "seq"),)

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    set_id: str = Field(max_length=64)
    item_id: str = Field(index=True, max_length=64)
    annotator: str = Field(max_length=128)
    kind: str = Field(max_length=16)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: int
    # Seconds from /next handing the item out to this label (None: labelled without /next, or by a judge).
    seconds: float | None = None


class IdempotencyKeyRow(SQLModel, table=True):
    """A POST's Idempotency-Key: reserved before its handler runs, then holding the response to replay.

    Unique on (tenant, key): the insert is the lock, so two API replicas never both run one key. A row
    without ``response_status`` is in flight; ``owner`` names the request holding it (release, completion
    and the lock refresh all check it), ``locked_at`` is when that request last refreshed its lock.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ux_idempotency_keys_tenant_key", "tenant", "idempotency_key", unique=True),)

    seq: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=128)
    idempotency_key: str = Field(max_length=255)
    owner: str = Field(max_length=32)
    locked_at: float
    expires_at: float = Field(index=True)
    created_at: int
    request_hash: str | None = Field(default=None, max_length=64)
    response_status: int | None = None
    response_content_type: str | None = Field(default=None, max_length=255)
    response_body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class ApiKeyRow(SQLModel, table=True):
    """An API key made by ``alignd-server keys create``: only the SHA-256 of its secret is stored.

    Rows are never deleted, only revoked, so "the database holds a key" never turns false again and revoking
    the last key cannot switch authentication off.
    """

    __tablename__ = "api_keys"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    name: str | None = Field(default=None, max_length=256)
    # Hex SHA-256 of the whole secret; every authenticated request looks its key up by it.
    key_hash: str = Field(unique=True, index=True, max_length=64)
    # The secret's first characters (``ak_live_`` and four random ones), shown in listings to tell keys apart.
    prefix: str = Field(max_length=32)
    created_at: int
    last_used_at: int | None = None
    revoked_at: int | None = None


class OpenAIFileRow(SQLModel, table=True):
    """A file uploaded through the OpenAI facade (``POST /openai/v1/files``): the bytes as sent, kept under
    ``openai_files/<id>.jsonl``. OpenAI's files carry no dataset kind, so none is decided at upload: the first
    job that uses the file converts it to the kind its method needs (supervised: sft, dpo: preference,
    reinforcement: prompts), validates it with alignd's rules, and stores it as an alignd dataset, whose id
    is remembered in ``datasets`` (kind -> id) for the next job."""

    __tablename__ = "openai_files"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    filename: str = Field(max_length=256)
    purpose: str = Field(max_length=32)
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    sha256: str = Field(max_length=64)
    datasets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: int


class OpenAIJobRow(SQLModel, table=True):
    """What a job made through the OpenAI facade adds to its alignd job (same id, ``jobs.id``): the OpenAI
    fields alignd's job has no column for, as the facade answers them."""

    __tablename__ = "openai_jobs"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    model: str = Field(max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    # ft:<base>:<suffix>:<job id>, shown once the job has succeeded; unique, so /models can look it up.
    fine_tuned_model: str = Field(unique=True, index=True, max_length=512)
    suffix: str | None = Field(default=None, max_length=64)
    # The OpenAI method as resolved ("auto" replaced by the value used), as GET answers it.
    method: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON, nullable=True))
    created_at: int


class OpenAIChatCompletionRow(SQLModel, table=True):
    """The output of a ``chat`` job (same id, ``jobs.id``), the job behind ``POST /openai/v1/chat/completions``.

    The facade adds it with the job; the runner replaces ``choices`` and ``usage`` with each ``chat`` line the
    child sends (every choice's whole text so far, contract/protocol.py), and the facade's request polls it
    for its answer, or its stream's next chunk. The database is the bus, as for job events: any API replica
    can answer for any worker."""

    __tablename__ = "openai_chat_completions"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(unique=True, index=True, max_length=64)
    tenant: str = Field(index=True, max_length=128)
    # The model as the request named it (a base model's id or name, or an ft: name): the answer's ``model``.
    model: str = Field(max_length=512)
    # [{index, text, finish_reason}], empty until the child accepted the prompt.
    choices: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: int

"""All configuration, read once from ``ALIGND_*`` environment variables and passed down explicitly.

Nothing below this module reads the environment: the app factory, the worker and the runner all take a
``Settings`` object, so tests build as many differently-configured servers as they like in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TENANT = "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="ignore")

    data_dir: Path = Field(Path(".alignd"), description="Local state: SQLite file, artifacts, work dirs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir.")
    storage_url: str | None = Field(
        None, description="file:///abs/path or s3://bucket/prefix; default data_dir/storage."
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint for MinIO and other S3-compatible stores."
    )
    s3_presign: bool = Field(False, description="Answer artifact downloads with 307 to a presigned URL.")
    queue: Literal["inline", "arq"] = Field("inline", description="inline: in-process; arq: Redis workers.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the arq queue.")
    api_keys: SecretStr | None = Field(
        None,
        description="'tenant-a:key1,tenant-b:key2', accepted beside the database's keys (`alignd-server keys`). "
        "Neither set: single tenant, no auth, loopback only.",
    )
    max_dataset_bytes: int = Field(1 << 30, ge=1, description="Largest dataset upload accepted.")
    max_model_bytes: int = Field(64 << 30, ge=1, description="Largest model upload accepted (all files).")
    tenant_max_dataset_bytes: str | None = Field(
        None,
        description="Per-tenant dataset upload caps, 'tenant-a:1048576,tenant-b:10485760' (bytes); each lowers "
        "ALIGND_MAX_DATASET_BYTES for that tenant, refusing a larger request body with 413.",
    )
    tenant_max_model_bytes: str | None = Field(
        None,
        description="Per-tenant model upload caps, same form; each lowers ALIGND_MAX_MODEL_BYTES for that tenant.",
    )
    idempotency_ttl_hours: float = Field(
        24.0,
        gt=0,
        description="How long a POST's Idempotency-Key and its stored response are kept for replay.",
    )
    idempotency_lock_seconds: float = Field(
        60.0,
        gt=0,
        description="A request holding an Idempotency-Key refreshes its lock every third of this; a lock not "
        "refreshed for this long (its API replica died) is taken over by the next request with the key.",
    )
    max_queued_jobs_per_tenant: int = Field(
        100, ge=1, description="Submissions beyond this many queued jobs get 429 too_many_queued_jobs."
    )
    worker_concurrency: int = Field(1, ge=1, description="Jobs run at once by one worker / embedded server.")
    worker_methods: str | None = Field(
        None,
        description="Comma-separated methods an `alignd-server worker` serves (e.g. 'sft,dpo'); unset: all. "
        "Each method has its own arq queue (alignd:queue:<method>), so a pool only ever sees its methods.",
    )
    worker_processes: int | None = Field(
        None,
        ge=1,
        description="Training processes this worker (or embedded server) runs at once, summed over its jobs "
        "(resources.processes each); unset: its CPU count, at least ALIGND_WORKER_CONCURRENCY. A job needing more than is free waits, queued, "
        "with a waiting_for_capacity event. Ignored when ALIGND_WORKER_GPUS is set.",
    )
    worker_gpus: int = Field(
        0,
        ge=0,
        description="GPUs of this worker: each job process takes one (CUDA_VISIBLE_DEVICES set per job, nccl "
        "between its processes); 0: CPU processes counted by ALIGND_WORKER_PROCESSES.",
    )
    pool_max_processes: int | None = Field(
        None,
        ge=1,
        description="The most processes the largest worker of the pool has: POST /v1/jobs refuses a job asking "
        "for more (422 insufficient_capacity). Unset: such a job is accepted and waits for a worker that fits.",
    )
    worker_metrics_port: int = Field(
        9100, ge=0, le=65535, description="Prometheus /metrics port of `alignd-server worker`; 0 disables it."
    )
    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="A running job's lease: a worker that stops heartbeating for this long loses the job, "
        "which the reconciler queues again.",
    )
    heartbeat_seconds: float = Field(
        2.0, gt=0, description="How often a runner extends its lease and reads the cancel flag."
    )
    reconcile_interval_seconds: float = Field(
        10.0,
        gt=0,
        description="How often the API's reconciler re-queues expired leases and lost queue entries.",
    )
    staging_sweep_after_seconds: float = Field(
        900.0,
        ge=0,
        description="A staging folder under data_dir/tmp that no request holds and nothing changed in for "
        "this long (a server killed mid-upload) is removed at start-up and by the reconciler.",
    )
    job_timeout_seconds: float = Field(
        48 * 3600.0,
        gt=0,
        description="arq job_timeout: a job running longer is stopped and marked failed (job_timeout).",
    )
    job_max_tries: int = Field(
        5,
        ge=1,
        description="arq max_tries: deliveries of one queue entry (worker crashes, database outages).",
    )
    chat_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="POST /openai/v1/chat/completions: how long a completion may wait in the queue and run "
        "before its chat job is cancelled and the request answered 504 (chat_timeout).",
    )
    db_retry_seconds: float = Field(
        2.0, gt=0, description="Delay between migration attempts while the database is unreachable at start."
    )
    cancel_grace_seconds: float = Field(10.0, ge=0, description="SIGTERM -> SIGKILL delay on cancel.")
    training_python: str | None = Field(
        None, description="Python executable for the training child; default the server's own."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads in the training child.")
    gc_freeze: bool = Field(
        True,
        description="Once the API has started, freeze what start-up allocated (gc.freeze) so that full garbage "
        "collections stop walking ~180,000 long-lived objects: each such pass held the event loop about 100 ms, "
        "the p99 tail of a polled GET under load (bench/api_gc.py, docs/performance.md). Undone at shutdown.",
    )
    kubeflow_template: Path | None = Field(
        None,
        description="The Kubeflow TrainJob template `alignd-server trainjob` renders a multi-node job's manifest "
        "from (the chart's ConfigMap, mounted in the worker pods when kubeflow.enabled). Rendering only: nothing "
        "submits the manifest (docs/deploy.md).",
    )
    kubeflow_image: str | None = Field(
        None, description="The training image a rendered TrainJob's nodes run (the chart: the worker image)."
    )
    log_level: str = Field("INFO")
    log_json: bool = Field(False, description="One JSON object per log line (production).")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'alignd.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "storage").as_uri()

    @property
    def work_dir(self) -> Path:
        """Scratch space for the runner: materialised inputs and the child's outputs."""
        return self.data_dir / "work"

    def tenant_keys(self) -> dict[str, str]:
        """API key -> tenant. Empty when auth is off."""
        if self.api_keys is None:
            return {}
        keys: dict[str, str] = {}
        for entry in self.api_keys.get_secret_value().split(","):
            entry = entry.strip()
            if not entry:
                continue
            tenant, sep, key = entry.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise ValueError("ALIGND_API_KEYS entries must look like 'tenant:key'")
            keys[key.strip()] = tenant.strip()
        return keys

    @field_validator("tenant_max_dataset_bytes", "tenant_max_model_bytes")
    @classmethod
    def _tenant_caps_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_tenant_caps(value)  # refuse a malformed value at start, not on the first upload
        return value

    def dataset_cap(self, tenant: str) -> int:
        """The largest dataset upload this tenant may send (its own cap, never above the server's)."""
        caps = parse_tenant_caps(self.tenant_max_dataset_bytes or "")
        return min(self.max_dataset_bytes, caps.get(tenant, self.max_dataset_bytes))

    def model_cap(self, tenant: str) -> int:
        """The largest model upload (all files) this tenant may send."""
        caps = parse_tenant_caps(self.tenant_max_model_bytes or "")
        return min(self.max_model_bytes, caps.get(tenant, self.max_model_bytes))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenant_keys())


def parse_tenant_caps(value: str) -> dict[str, int]:
    """'tenant-a:1048576,tenant-b:2048' -> {tenant: bytes}; ValueError names the bad entry."""
    caps: dict[str, int] = {}
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, raw = entry.rpartition(":")
        raw = raw.strip()
        if not sep or not tenant.strip() or not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"per-tenant cap {entry!r} must look like 'tenant:bytes' with bytes >= 1")
        caps[tenant.strip()] = int(raw)
    return caps

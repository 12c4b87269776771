"""Typed response models. They accept extra fields so a newer server never breaks an older SDK."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Artifact",
    "Dataset",
    "Job",
    "JobError",
    "JobEvent",
    "Metric",
    "MetricList",
    "Model",
    "Timestamp",
]

Timestamp = int | float
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class AlignObject(BaseModel):
    """Base of every response model: unknown fields are kept (``obj.model_extra``), never refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class Model(AlignObject):
    id: str
    object: str = "model"
    name: str | None = None
    architecture: str | None = None
    num_parameters: int | None = None
    size_bytes: int | None = None
    status: str | None = None
    created_at: Timestamp | None = None


class Dataset(AlignObject):
    id: str
    object: str = "dataset"
    name: str | None = None
    kind: str | None = None
    num_records: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    status: str | None = None
    created_at: Timestamp | None = None


class JobError(AlignObject):
    code: str | None = None
    message: str | None = None


class Job(AlignObject):
    id: str
    object: str = "job"
    name: str | None = None
    method: str | None = None
    # A plain str, not the Literal: a future status must not break an old SDK.
    status: str = "queued"
    stage: str | None = None
    base_model: str | None = None
    datasets: dict[str, str] = Field(default_factory=dict)
    init_adapter: str | None = None
    reward_model: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] | None = None
    seed: int | None = None
    progress: float | None = None
    error: JobError | None = None
    created_at: Timestamp | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the job is ``succeeded``, ``failed`` or ``cancelled``."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class Artifact(AlignObject):
    id: str
    object: str = "artifact"
    job: str | None = None
    stage: str | None = None
    kind: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: Timestamp | None = None


class JobEvent(AlignObject):
    id: int | str | None = None
    created_at: Timestamp | None = None
    level: str | None = None
    stage: str | None = None
    message: str | None = None


class Metric(AlignObject):
    stage: str | None = None
    step: int | float | None = None
    name: str
    value: float | None = None


class MetricList(list[Metric]):
    """The rows of ``GET /v1/jobs/{id}/metrics`` in server order, with pandas-free helpers."""

    def as_dict(self, *, stage: str | None = None) -> dict[str, dict[str, list[Any]]]:
        """``{name: {"step": [...], "value": [...]}}``, optionally only for one ``stage``.

        >>> rows = MetricList(
        ...     [Metric(name="loss", step=1, value=2.0), Metric(name="loss", step=2, value=1.5)]
        ... )
        >>> rows.as_dict()
        {'loss': {'step': [1, 2], 'value': [2.0, 1.5]}}
        """
        out: dict[str, dict[str, list[Any]]] = {}
        for row in self:
            if stage is not None and row.stage != stage:
                continue
            series = out.setdefault(row.name, {"step": [], "value": []})
            series["step"].append(row.step)
            series["value"].append(row.value)
        return out

    def latest(self, name: str, *, stage: str | None = None) -> Metric | None:
        """The last row named ``name`` (optionally in ``stage``), or None."""
        for row in reversed(self):
            if row.name == name and (stage is None or row.stage == stage):
                return row
        return None

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self:
            seen.setdefault(row.name, None)
        return list(seen)

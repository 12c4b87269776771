"""The contract between the runner (parent, no torch) and the training child (``python -m workers.training``).

Parent -> child: a JSON file, :class:`TrainingSpec`, whose path is the child's only argument. Every path in it
is local and absolute; the runner has already fetched the base model, datasets and input adapters from storage.

Child -> parent: one JSON object per line on the child's **stdout**, which carries nothing else (the child
points ``sys.stdout`` at stderr at start, so library prints cannot corrupt the stream). Lines:

- ``{"type": "event", "level": "info"|"warning"|"error", "stage": str, "message": str}``
- ``{"type": "metric", "stage": str, "step": int, "values": {name: float, ...}}``
- ``{"type": "progress", "stage": str, "progress": float}``  (0..1 over the whole job)
- ``{"type": "artifact", "stage": str, "kind": "adapter"|"reward_model"|"model_card"|"checkpoint"|"eval",
  "path": str, "metadata": {...}}``  (a folder whose files become the artifact's .tar.gz root; an ``eval``
  artifact's metadata is ``{"evaluation": <contract.evaluation.EvaluationResult>}``)
- ``{"type": "checkpoint", "stage": str, "step": int, "path": str, "stage_complete": bool}``  (a complete
  checkpoint folder, already renamed into place; the runner stores it as a ``checkpoint`` artifact and may
  delete the folder at once. ``stage_complete``: the stage's artifacts were all announced before this line,
  so a resume skips the stage; see workers/training/checkpoint.py for the folder's contents)
- ``{"type": "dataset", "stage": str, "kind": "candidates", "path": str, "name": str, "metadata": {...}}``  (a
  JSONL file the runner checks with the dataset rules of ``kind`` and stores as a new dataset made by the job)
- ``{"type": "monitor", "stage": str, "name": str, "step": int, "value": float, "threshold": float,
  "message": str, "stop": bool}``  (a reward-hacking monitor fired at that PPO update; the runner stores it
  as a warning event and in the job's ``monitors``. ``stop``: it is in ``stop_on`` and the child ends the
  stage early, succeeding: the job's ``status_reason`` becomes ``stopped_by_monitor``)
- ``{"type": "chat", "stage": "chat", "choices": [{"index": int, "text": str, "finish_reason": null|"stop"|
  "length"}], "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}}``  (a ``chat``
  job's completion so far: each choice's whole text, never a delta, so each line replaces the one before and
  a reader that misses lines loses nothing; a text only grows from one line to the next. The first line, with
  empty texts, says the prompt was accepted; the last has every ``finish_reason`` set)
- ``{"type": "error", "code": str, "message": str}``  (then the child exits non-zero)

Exit status 0 means every artifact line has been written; anything else is a failure.
"""

from __future__ import annotations

import json
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.evaluation import EvaluationSpec
from contract.resources import Resources

ArtifactKind = Literal[
    "adapter", "reward_model", "model_card", "checkpoint", "eval", "item_scores", "judge_labels"
]

# Written last into a checkpoint folder (workers/training/checkpoint.py): a folder without it is incomplete.
CHECKPOINT_META_FILE = "checkpoint.json"
# Left by the runner next to the spec file before it sends SIGTERM for a pause (not a cancel): the child then
# saves a checkpoint of the step it finished before it exits, so a resume loses no step.
PAUSE_FLAG_FILE = "pause-requested"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelRef(_Spec):
    id: str
    name: str
    path: str = Field(description="Local folder holding config.json, *.safetensors and tokenizer files.")


class DatasetRef(_Spec):
    id: str
    name: str
    kind: str
    sha256: str
    num_records: int
    path: str = Field(description="Local JSONL file, already validated at upload.")
    source_kind: str | None = Field(
        None,
        description="Set when the runner converted the dataset for this role: 'ranking' means the file holds "
        "the ranking's (better, worse) pairs as preference lines, each with a 'group' (its source line) that "
        "keeps one prompt's pairs in one batch (service/core/ranking.py).",
    )


class AdapterRef(_Spec):
    id: str
    path: str = Field(description="Local folder with adapter_config.json and adapter_model.safetensors.")


class ResumeRef(_Spec):
    """Where a resumed attempt starts: a checkpoint folder the runner fetched from storage."""

    path: str = Field(description="Local folder of the checkpoint (checkpoint.json and its state files).")
    stage: str = Field(description="Stage the checkpoint was taken in.")
    step: int = Field(ge=0, description="Optimizer steps (PPO updates) of that stage already done.")
    stage_complete: bool = Field(
        False, description="The stage finished and its artifacts are stored: start at the next stage."
    )


class TrainingSpec(_Spec):
    job_id: str
    method: str
    base_model: BaseModelRef
    datasets: dict[str, DatasetRef] = Field(description="Keyed by role, which is also the dataset kind.")
    init_adapter: AdapterRef | None = None
    reward_model: AdapterRef | None = None
    init_reward_model: AdapterRef | None = Field(
        None, description="A reward model to continue training (reward_model and rlhf; a new feedback round)."
    )
    lora: dict[str, Any] = Field(description="Resolved contract.hyperparameters.LoraSettings.")
    hyperparameters: dict[str, Any] = Field(description="Resolved hyperparameters of the method.")
    seed: int
    resources: Resources = Field(
        default_factory=Resources,
        description="Processes of the job (contract/resources.py): N > 1 runs the child under torchrun.",
    )
    output_dir: str = Field(description="Empty folder the child writes artifacts under.")
    checkpoint_dir: str | None = Field(None, description="Where the child writes checkpoints (None: none).")
    resume_from: ResumeRef | None = Field(
        None, description="Continue from this checkpoint instead of step 0."
    )
    stage_artifacts: dict[str, AdapterRef] = Field(
        default_factory=dict,
        description="Multi-stage jobs resumed past a stage: that stage's stored output (sft: its adapter, "
        "reward_model: the reward model), keyed by stage, so the stage is not run again.",
    )
    evaluation: EvaluationSpec | None = Field(None, description="The evaluate job's spec (evaluate only).")
    evaluation_artifacts: dict[str, AdapterRef] = Field(
        default_factory=dict,
        description="evaluate: every artifact its spec names (candidate and judge adapters, reward-model "
        "graders' artifacts), keyed by artifact id, fetched to local folders.",
    )

    @classmethod
    def read(cls, path: str) -> TrainingSpec:
        with open(path, encoding="utf-8") as handle:
            return cls.model_validate_json(handle.read())


class ProgressWriter:
    """Child side: writes protocol lines, flushed at once so the parent sees them as they happen."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def _emit(self, payload: dict[str, Any]) -> None:
        self._stream.write(json.dumps(payload, allow_nan=False, default=float) + "\n")
        self._stream.flush()

    def event(self, message: str, *, stage: str, level: str = "info") -> None:
        self._emit({"type": "event", "level": level, "stage": stage, "message": message})

    def metric(self, *, stage: str, step: int, values: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v == v and abs(float(v)) != float("inf")}
        self._emit({"type": "metric", "stage": stage, "step": int(step), "values": finite})

    def progress(self, fraction: float, *, stage: str) -> None:
        self._emit({"type": "progress", "stage": stage, "progress": min(1.0, max(0.0, float(fraction)))})

    def artifact(
        self, path: str, *, stage: str, kind: ArtifactKind, metadata: dict[str, Any] | None = None
    ) -> None:
        self._emit(
            {"type": "artifact", "stage": stage, "kind": kind, "path": path, "metadata": metadata or {}}
        )

    def checkpoint(self, path: str, *, stage: str, step: int, stage_complete: bool = False) -> None:
        self._emit(
            {
                "type": "checkpoint",
                "stage": stage,
                "step": int(step),
                "path": path,
                "stage_complete": bool(stage_complete),
            }
        )

    def dataset(
        self, path: str, *, stage: str, kind: str, name: str, metadata: dict[str, Any] | None = None
    ) -> None:
        self._emit(
            {
                "type": "dataset",
                "stage": stage,
                "kind": kind,
                "path": path,
                "name": name,
                "metadata": metadata or {},
            }
        )

    def monitor(
        self,
        message: str,
        *,
        stage: str,
        name: str,
        step: int,
        value: float,
        threshold: float,
        stop: bool = False,
    ) -> None:
        self._emit(
            {
                "type": "monitor",
                "stage": stage,
                "name": name,
                "step": int(step),
                "value": float(value),
                "threshold": float(threshold),
                "message": message,
                "stop": bool(stop),
            }
        )

    def chat(self, *, choices: list[dict[str, Any]], usage: dict[str, int]) -> None:
        self._emit({"type": "chat", "stage": "chat", "choices": choices, "usage": usage})

    def error(self, message: str, *, code: str) -> None:
        self._emit({"type": "error", "code": code, "message": message})


def parse_line(line: str) -> dict[str, Any] | None:
    """Parent side: one stdout line -> message dict, or None for a line that is not protocol."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict) or "type" not in message:
        return None
    return message

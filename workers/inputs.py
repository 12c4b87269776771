"""A job's inputs on local disk (base model, datasets, adapters) and the TrainingSpec the child reads.

Inputs are immutable once uploaded, so each is fetched once into a cache folder under the data directory
and reused by every later job (a folder counts once its ``.complete`` marker, written last, exists).
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import select

from contract.evaluation import EvaluationSpec, evaluation_of, model_refs
from contract.graders import leaves
from contract.hyperparameters import HELD_OUT_EVAL_ROLE, HeldOutEvalSettings, held_out_eval_block
from contract.protocol import AdapterRef, BaseModelRef, DatasetRef, ResumeRef, TrainingSpec
from contract.resources import Resources, resources_of, without_resources
from service.core import ranking
from service.db.session import session_scope
from service.db.tables import ArtifactRow, DatasetRow, JobRow, ModelRow
from service.storage import ArtifactStore
from service.storage.keys import dataset_key, model_key

# The job's fields that name an adapter-like artifact the child loads (None when the job sets none).
ADAPTER_FIELDS = ("init_adapter", "reward_model", "init_reward_model")


class InputMissing(Exception):
    """A model, dataset or artifact the job names was deleted after the job was accepted."""


class InputCache:
    """The local copies of inputs, one folder per resource under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Concurrent jobs (ALIGND_WORKER_CONCURRENCY > 1) often share a base model: one download at a time
        # into the cache, or two writers of the same file would interleave.
        self._lock = threading.Lock()

    def folder(self, kind: str, resource_id: str) -> Path:
        return self.root / kind / resource_id

    def model(self, store: ArtifactStore, model: ModelRow) -> Path:
        folder = self.folder("models", model.id)
        with self._lock:
            if (folder / ".complete").exists():
                return folder
            folder.mkdir(parents=True, exist_ok=True)
            for filename in model.files:
                store.get_to_path(model_key(model.id, filename), folder / filename)
            (folder / ".complete").touch()
        return folder

    def dataset(self, store: ArtifactStore, dataset: DatasetRow) -> Path:
        local = store.local_path(dataset_key(dataset.id))
        if local is not None:
            return local
        path = self.folder("datasets", dataset.id) / "data.jsonl"
        with self._lock:
            if not path.exists():
                store.get_to_path(dataset_key(dataset.id), path)
        return path

    def artifact(self, store: ArtifactStore, artifact: ArtifactRow) -> Path:
        folder = self.folder("artifacts", artifact.id)
        with self._lock:
            if (folder / ".complete").exists():
                return folder
            folder.mkdir(parents=True, exist_ok=True)
            archive = folder.parent / f"{artifact.id}.tar.gz"
            store.get_to_path(artifact.storage_key, archive)
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(folder, filter="data")  # written by us, but never trust paths blindly
            archive.unlink()
            (folder / ".complete").touch()
        return folder

    def expanded_ranking(self, row: DatasetRow, path: Path) -> DatasetRef:
        """A ``ranking`` dataset in the ``preference`` role, as the (better, worse) pairs the trainers read.

        Expanded once per dataset into the input cache (inputs are immutable); each pair keeps its source line
        as ``group`` so the reward trainer can keep one prompt's pairs in one batch.
        """
        folder = self.folder("datasets", row.id)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = folder / "pairs.jsonl"
        if not pairs.exists():  # expand_file renames into place: an existing file is complete
            ranking.expand_file(path, pairs)
        digest = hashlib.sha256()
        count = 0
        with open(pairs, "rb") as handle:
            for line in handle:
                digest.update(line)
                count += 1
        return DatasetRef(
            id=row.id,
            name=row.name,
            kind="preference",
            sha256=digest.hexdigest(),
            num_records=count,
            path=str(pairs),
            source_kind="ranking",
        )


@dataclass(frozen=True)
class JobInputs:
    base_model: BaseModelRef
    datasets: dict[str, DatasetRef]
    adapters: dict[str, AdapterRef | None]  # keyed by ADAPTER_FIELDS
    evaluation: EvaluationSpec | None = None
    evaluation_artifacts: dict[str, AdapterRef] | None = None  # evaluate: keyed by artifact id


def _artifact_ref(session: Any, store: ArtifactStore, cache: InputCache, artifact_id: str) -> AdapterRef:
    artifact = session.exec(select(ArtifactRow).where(ArtifactRow.id == artifact_id)).first()
    if artifact is None:
        raise InputMissing(f"artifact {artifact_id} no longer exists")
    return AdapterRef(id=artifact.id, path=str(cache.artifact(store, artifact)))


def _evaluation_inputs(
    session: Any, store: ArtifactStore, cache: InputCache, job: JobRow
) -> tuple[EvaluationSpec | None, dict[str, AdapterRef]]:
    """An evaluate job's spec and every artifact it names (candidate and judge adapters, reward models)."""
    stored = evaluation_of(job.method, job.hyperparameters)
    if stored is None:
        return None, {}
    spec = EvaluationSpec.model_validate(stored)
    artifact_ids = sorted({ref for _, ref, _ in model_refs(spec) if ref.startswith("art_")})
    return spec, {ref: _artifact_ref(session, store, cache, ref) for ref in artifact_ids}


def _held_out_eval_inputs(
    session: Any, store: ArtifactStore, cache: InputCache, job: JobRow
) -> tuple[DatasetRef | None, dict[str, AdapterRef]]:
    """The prompts of an online job's (or rlhf last stage's) eval block and the artifacts its graders name
    (reward models and judge adapters), both checked at submission and fetched like every other input."""
    block, _ = held_out_eval_block(job.method, job.hyperparameters)
    if block is None:
        return None, {}
    settings = HeldOutEvalSettings.model_validate(block)
    row = session.exec(select(DatasetRow).where(DatasetRow.id == settings.prompts)).first()
    if row is None:
        raise InputMissing(f"dataset {settings.prompts} no longer exists")
    ref = DatasetRef(
        id=row.id,
        name=row.name,
        kind=row.kind,
        sha256=row.sha256,
        num_records=row.num_records,
        path=str(cache.dataset(store, row)),
    )
    named = set()
    for grader in settings.graders:
        for _, leaf in leaves(grader):
            model = getattr(leaf, "artifact", None) or getattr(leaf, "model", None)
            if isinstance(model, str) and model.startswith("art_"):
                named.add(model)
    return ref, {
        artifact_id: _artifact_ref(session, store, cache, artifact_id) for artifact_id in sorted(named)
    }


def fetch_inputs(engine: Engine, store: ArtifactStore, cache: InputCache, job: JobRow) -> JobInputs:
    """Every input of ``job`` on local disk; raises InputMissing when one no longer exists."""
    with session_scope(engine) as session:
        model = session.exec(select(ModelRow).where(ModelRow.id == job.base_model)).first()
        if model is None:
            raise InputMissing(f"base model {job.base_model} no longer exists")
        model_ref = BaseModelRef(id=model.id, name=model.name, path=str(cache.model(store, model)))
        datasets: dict[str, DatasetRef] = {}
        for role, dataset_id in job.datasets.items():
            row = session.exec(select(DatasetRow).where(DatasetRow.id == dataset_id)).first()
            if row is None:
                raise InputMissing(f"dataset {dataset_id} no longer exists")
            path = cache.dataset(store, row)
            if role == "preference" and row.kind == "ranking":
                datasets[role] = cache.expanded_ranking(row, path)
                continue
            datasets[role] = DatasetRef(
                id=row.id,
                name=row.name,
                kind=row.kind,
                sha256=row.sha256,
                num_records=row.num_records,
                path=str(path),
            )
        adapters: dict[str, AdapterRef | None] = {}
        for field in ADAPTER_FIELDS:
            artifact_id = getattr(job, field)
            adapters[field] = (
                None if artifact_id is None else _artifact_ref(session, store, cache, artifact_id)
            )
        evaluation, evaluation_artifacts = _evaluation_inputs(session, store, cache, job)
        eval_prompts, eval_artifacts = _held_out_eval_inputs(session, store, cache, job)
        if eval_prompts is not None:
            datasets[HELD_OUT_EVAL_ROLE] = eval_prompts
            evaluation_artifacts = {**evaluation_artifacts, **eval_artifacts}
    return JobInputs(
        base_model=model_ref,
        datasets=datasets,
        adapters=adapters,
        evaluation=evaluation,
        evaluation_artifacts=evaluation_artifacts,
    )


def write_spec(
    job: JobRow,
    inputs: JobInputs,
    *,
    attempt_dir: Path,
    checkpoint_dir: Path,
    resume_from: ResumeRef | None,
    stage_artifacts: dict[str, AdapterRef],
) -> TrainingSpec:
    """The child's TrainingSpec, written to ``attempt_dir/spec.json``; its outputs go to ``attempt_dir/out``."""
    output_dir = attempt_dir / "out"
    output_dir.mkdir()
    spec = TrainingSpec(
        job_id=job.id,
        method=job.method,
        base_model=inputs.base_model,
        datasets=inputs.datasets,
        init_adapter=inputs.adapters["init_adapter"],
        init_reward_model=inputs.adapters["init_reward_model"],
        reward_model=inputs.adapters["reward_model"],
        lora=job.lora,
        # An evaluate job's hyperparameters column holds its evaluation spec, handed over on its own.
        hyperparameters={} if inputs.evaluation is not None else without_resources(job.hyperparameters),
        seed=job.seed,
        resources=resources_of(job.hyperparameters) if inputs.evaluation is None else Resources(),
        output_dir=str(output_dir),
        checkpoint_dir=str(checkpoint_dir),
        resume_from=resume_from,
        stage_artifacts=stage_artifacts,
        evaluation=inputs.evaluation,
        evaluation_artifacts=inputs.evaluation_artifacts or {},
    )
    (attempt_dir / "spec.json").write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    return spec

"""What a job asks of a worker: ``resources: {"processes": N, "strategy": "ddp", "precision": "auto"}``
(torch-free, shared).

``processes`` is the number of training processes of one job on one node: on a CPU worker, processes (gloo);
on a GPU worker (``ALIGND_WORKER_GPUS`` > 0), one GPU each (nccl). With N > 1 the runner starts the child
through ``torch.distributed.run`` (torchrun) with ``--nproc_per_node=N``; every process holds a replica of the
trainable (LoRA) parameters and computes on its share of each step's batch, gradients summed across processes
before the optimizer step (data parallel). ``batch_size`` keeps its meaning: the examples (pairs, rollout
prompts) of one optimizer step across all processes, so a job's loss curve does not depend on N (up to float
reduction order) and a checkpoint resumes on any N. ``strategy: "fsdp"`` (any method of
:data:`DISTRIBUTED_METHODS`) shards each decoder layer's weights across the processes instead of copying the
base into every one (``workers/training/sharding.py``); every rank then runs the same number of forwards (the
samplers decode until every rank's answers ended), which a score_model judge grader, decoding its own answers
inside the reward, cannot: refused with fsdp (:func:`uses_model_judge`).

The stored form: a job's ``resources`` travels inside its hyperparameters JSON under :data:`RESOURCES_KEY`
(no database column; only when it differs from the default), and the runner hands it to the child as
``TrainingSpec.resources``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.methods import Method

RESOURCES_KEY = "resources"
MAX_PROCESSES = 64


def uses_model_judge(value: Any) -> bool:
    """Whether any grader spec inside ``value`` (hyperparameters, nested anywhere) is a score_model judge."""
    if isinstance(value, Mapping):
        return value.get("type") == "score_model" or any(uses_model_judge(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(uses_model_judge(v) for v in value)
    return False


# Methods whose trainers run data-parallel today; the others refuse processes > 1 at submission (422).
DISTRIBUTED_METHODS: frozenset[Method] = frozenset(
    {Method.sft, Method.reward_model, Method.dpo, Method.ppo, Method.grpo, Method.rloo, Method.rlhf}
)

# Exit status of the launcher (workers/training/launch.py) when a rank was killed by a signal nobody on our
# side sent (OOM killer, an operator's kill -9): a crash, retried from the newest checkpoint like a killed
# single-process child. EX_TEMPFAIL from sysexits.h.
EXIT_RANK_LOST = 75


Precision = Literal["auto", "fp32", "bf16"]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    processes: int = Field(
        1,
        ge=1,
        le=MAX_PROCESSES,
        description="Training processes for this job on one worker (GPUs on a GPU worker); 1: no torchrun.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole base, the LoRA weights and the optimizer, gradients "
        "summed across processes each step. fsdp (processes >= 2; not with a score_model judge grader): each decoder "
        "layer's weights (base and LoRA) and optimizer state are sharded across the processes (PyTorch FSDP2 "
        "fully_shard), gathered per layer for its forward and backward; for bases too large for one device. "
        "Embeddings and heads stay whole on every process.",
    )
    precision: Precision = Field(
        "auto",
        description="The frozen base's weights and activations: auto (bf16 on a CUDA GPU that supports it, "
        "else fp32), fp32, or bf16. LoRA weights, optimizer state, losses, log-probs and rewards stay fp32 "
        "in every case. bf16 on a CPU is fast only where the CPU multiplies bf16 matrices natively (Intel "
        "AMX, Sapphire Rapids and later: docs/performance.md has the measured PPO speed); elsewhere it is "
        "emulated and slower.",
    )

    @property
    def is_default(self) -> bool:
        return self.processes == 1 and self.strategy == "ddp" and self.precision == "auto"


def resources_of(hyperparameters: Mapping[str, Any] | None) -> Resources:
    """A stored job's resources (the default when its hyperparameters carry none)."""
    raw = (hyperparameters or {}).get(RESOURCES_KEY)
    return Resources.model_validate(raw) if isinstance(raw, Mapping) else Resources()


def without_resources(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The method's own hyperparameters, the stored resources taken out."""
    return {key: value for key, value in hyperparameters.items() if key != RESOURCES_KEY}

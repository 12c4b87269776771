"""Failures the child reports to the runner as ``{"type": "error", "code", "message"}`` (no torch here)."""

from __future__ import annotations

# Stable codes: the runner copies them into the job's `error.code`, so clients may branch on them.
INVALID_SPEC = "invalid_spec"
METHOD_NOT_AVAILABLE = "method_not_available"
INVALID_HYPERPARAMETERS = "invalid_hyperparameters"
INVALID_LORA = "invalid_lora"
INVALID_DATASET = "invalid_dataset"
NO_TRAINABLE_EXAMPLES = "no_trainable_examples"
MODEL_LOAD_FAILED = "model_load_failed"
REMOTE_CODE_NOT_ALLOWED = "remote_code_not_allowed"
INVALID_ADAPTER = "invalid_adapter"
OUT_OF_MEMORY = "out_of_memory"
TRAINING_DIVERGED = "training_diverged"
# rlhf quality gate: the reward model's held-out accuracy is below reward_model.min_eval_accuracy.
REWARD_MODEL_TOO_WEAK = "reward_model_too_weak"
INTERNAL_ERROR = "internal_error"


class TrainingError(Exception):
    """A failure with a known cause: the child emits an ``error`` line with ``code`` and exits 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(BaseException):
    """SIGTERM arrived: unwind without saving anything further.

    A BaseException so that no ``except Exception`` on the way up (ours or a library's) swallows it.
    """

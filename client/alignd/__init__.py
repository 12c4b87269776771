"""alignd: the Python SDK and CLI for the alignd alignment service.

>>> import alignd
>>> client = alignd.Client()  # ALIGND_BASE_URL, ALIGND_API_KEY
>>> model = client.models.upload("./SmolLM2-135M-Instruct")
>>> data = client.datasets.upload("train.jsonl", kind="sft")
>>> job = client.jobs.create(method="sft", base_model=model.id, datasets={"sft": data.id})
>>> job = client.jobs.wait(job.id, progress=True)
>>> folder = client.artifacts.download(client.jobs.artifacts(job.id)[0].id, "./adapter")
"""

from alignd._async import AsyncClient
from alignd._client import Client
from alignd._errors import (
    AlignError,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IntegrityError,
    JobFailedError,
    JobWaitTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    UnsafeArchiveError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from alignd._version import __version__
from alignd.pagination import AsyncPage, AsyncPaginator, SyncPage
from alignd.types import (
    Artifact,
    Dataset,
    Evaluation,
    EvaluationPrompt,
    FeedbackItem,
    FeedbackLabel,
    FeedbackRatings,
    FeedbackSet,
    GraderRun,
    GraderValidation,
    Job,
    JobError,
    JobEvent,
    Metric,
    MetricList,
    Model,
    PromptAnswer,
)

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AlignError",
    "Artifact",
    "AsyncClient",
    "AsyncPage",
    "AsyncPaginator",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Dataset",
    "Evaluation",
    "EvaluationPrompt",
    "FeedbackItem",
    "FeedbackLabel",
    "FeedbackRatings",
    "FeedbackSet",
    "GraderRun",
    "GraderValidation",
    "IntegrityError",
    "Job",
    "JobError",
    "JobEvent",
    "JobFailedError",
    "JobWaitTimeoutError",
    "Metric",
    "MetricList",
    "Model",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PromptAnswer",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "SyncPage",
    "UnsafeArchiveError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "__version__",
]

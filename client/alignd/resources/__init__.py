"""One module per REST resource; each holds the sync class and its ``Async`` twin."""

from alignd.resources.artifacts import Artifacts, AsyncArtifacts
from alignd.resources.datasets import AsyncDatasets, Datasets
from alignd.resources.evals import AsyncEvals, Evals
from alignd.resources.feedback_sets import AsyncFeedbackSets, FeedbackSets
from alignd.resources.graders import AsyncGraders, Graders
from alignd.resources.jobs import AsyncJobs, Jobs
from alignd.resources.models import AsyncModels, Models

__all__ = [
    "Artifacts",
    "AsyncArtifacts",
    "AsyncDatasets",
    "AsyncEvals",
    "AsyncFeedbackSets",
    "AsyncGraders",
    "AsyncJobs",
    "AsyncModels",
    "Datasets",
    "Evals",
    "FeedbackSets",
    "Graders",
    "Jobs",
    "Models",
]

"""One module per REST resource; each holds the sync class and its ``Async`` twin."""

from alignd.resources.artifacts import Artifacts, AsyncArtifacts
from alignd.resources.datasets import AsyncDatasets, Datasets
from alignd.resources.feedback_sets import AsyncFeedbackSets, FeedbackSets
from alignd.resources.jobs import AsyncJobs, Jobs
from alignd.resources.models import AsyncModels, Models

__all__ = [
    "Artifacts",
    "AsyncArtifacts",
    "AsyncDatasets",
    "AsyncFeedbackSets",
    "AsyncJobs",
    "AsyncModels",
    "Datasets",
    "FeedbackSets",
    "Jobs",
    "Models",
]

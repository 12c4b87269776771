"""Artifact storage: one small interface, a local-folder implementation (S3 plugs in behind the same one)."""

from __future__ import annotations

from service.storage.base import ArtifactStore, StorageUnavailable, open_store

__all__ = ["ArtifactStore", "StorageUnavailable", "open_store"]

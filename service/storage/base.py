"""The ArtifactStore protocol: bytes by key. Keys are relative POSIX paths such as ``models/<id>/config.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

CHUNK = 1 << 20


class StorageUnavailable(RuntimeError):
    """The backing store cannot be reached (the API answers 503)."""


@runtime_checkable
class ArtifactStore(Protocol):
    def put_file(self, key: str, path: Path) -> int:
        """Store a local file under ``key`` (atomically: readers never see a partial object). Returns size."""
        ...

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        """Store everything read from ``stream`` under ``key``. Returns size."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream an object's bytes. Raises KeyError when absent."""
        ...

    def get_to_path(self, key: str, dest: Path) -> None:
        """Copy an object to a local file (atomically)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Delete one object; absent is fine."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (a folder-like key ending in '/')."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder-like key ending in '/'), sorted; empty when there are none."""
        ...

    def presigned_url(self, key: str, *, expires_in: int = 3600) -> str | None:
        """A URL a client can GET without credentials, or None when the store cannot make one."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine when the store is a local folder (lets runners skip a copy)."""
        ...

    def ping(self) -> None:
        """Raise StorageUnavailable when the store cannot be reached."""
        ...


def open_store(url: str, *, s3_endpoint_url: str | None = None) -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from service.storage.local import LocalStore

        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        try:
            from service.storage.s3 import S3Store  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ValueError("s3:// storage needs the production extra (boto3)") from exc
        return S3Store(bucket=parsed.netloc, prefix=parsed.path.lstrip("/"), endpoint_url=s3_endpoint_url)
    raise ValueError(f"Unsupported ALIGND_STORAGE_URL scheme: {url!r} (use file:// or s3://)")

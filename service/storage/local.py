"""A local folder as artifact store (embedded mode)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.storage.base import CHUNK, StorageUnavailable


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("..", ".") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def _atomic_write(self, key: str, write: Callable[[BinaryIO], int]) -> int:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                size: int = write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write {key}: {exc}") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def put_file(self, key: str, path: Path) -> int:
        def write(handle: BinaryIO) -> int:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, handle, CHUNK)
            return path.stat().st_size

        return self._atomic_write(key, write)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        def write(handle: BinaryIO) -> int:
            total = 0
            while chunk := stream.read(CHUNK):
                handle.write(chunk)
                total += len(chunk)
            return total

        return self._atomic_write(key, write)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below

        def generate() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return generate()

    def get_to_path(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise KeyError(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/"))
        if not folder.is_dir():
            return []
        # Half-written ".tmp-" files of a killed writer are listed too: they are keys nobody will finish.
        return sorted(path.relative_to(self.root).as_posix() for path in folder.rglob("*") if path.is_file())

    def presigned_url(self, key: str, *, expires_in: int = 3600) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"artifact folder {self.root} is missing or not writable")

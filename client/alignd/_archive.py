"""Checking and extracting downloaded artifacts without trusting them.

:func:`safe_extract` reads every member header first and refuses the whole archive (writing nothing) if
any member is not a plain file or folder, has an absolute name, a ``..`` part, a drive or backslash, or if
a member or the total is over its size cap. Only then does it write, itself, each file below ``dest``
(never through ``TarFile.extract``), refusing to follow a symlink that might already sit in ``dest``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from alignd._errors import IntegrityError, UnsafeArchiveError

DEFAULT_MAX_MEMBER_BYTES = 64 * 1024**3
DEFAULT_MAX_TOTAL_BYTES = 64 * 1024**3
DEFAULT_MAX_MEMBERS = 10_000
CHUNK = 1024 * 1024


class Sha256Writer:
    """Writes chunks to a file while hashing and counting them."""

    def __init__(self, handle: IO[bytes], *, max_bytes: int | None = None) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.size = 0
        self._max = max_bytes

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            raise IntegrityError(f"download exceeds its announced/allowed size of {self._max} bytes")
        self._hash.update(chunk)
        self._handle.write(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def verify_sha256(actual: str, expected: str | None, *, what: str) -> None:
    if expected and actual.lower() != expected.lower():
        raise IntegrityError(f"sha256 mismatch for {what}: expected {expected}, got {actual}; file discarded")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _member_parts(name: str) -> tuple[str, ...]:
    """Normalised relative parts of a member name, or raise UnsafeArchiveError."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"archive member with an empty or NUL name: {name!r}")
    if "\\" in name:
        raise UnsafeArchiveError(f"archive member with a backslash in its name: {name!r}")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise UnsafeArchiveError(f"archive member with an absolute path: {name!r}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member escaping the destination with '..': {name!r}")
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":
        raise UnsafeArchiveError(f"archive member with a drive letter: {name!r}")
    return parts


def check_members(
    members: list[tarfile.TarInfo],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """Validate every member; return the (member, parts) to extract. Raises on the first unsafe one."""
    if len(members) > max_members:
        raise UnsafeArchiveError(f"archive has {len(members)} members, more than the cap of {max_members}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    plan: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    for member in members:
        parts = _member_parts(member.name)
        if member.issym() or member.islnk():
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a {'symlink' if member.issym() else 'hardlink'} "
                f"(to {member.linkname!r}); links are refused"
            )
        if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
            raise UnsafeArchiveError(f"archive member {member.name!r} is a device or fifo; refused")
        if not (member.isreg() or member.isdir()):
            raise UnsafeArchiveError(f"archive member {member.name!r} is not a regular file or folder")
        if not parts:
            if member.isdir():
                continue  # the archive's "./" root
            raise UnsafeArchiveError(f"archive member with an empty name: {member.name!r}")
        if member.isreg():
            if member.size < 0 or member.size > max_member_bytes:
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} is {member.size} bytes, over the cap of "
                    f"{max_member_bytes}"
                )
            total += member.size
            if total > max_total_bytes:
                raise UnsafeArchiveError(
                    f"archive unpacks to more than the cap of {max_total_bytes} bytes (at {member.name!r})"
                )
            if parts in seen:
                raise UnsafeArchiveError(f"archive member {member.name!r} appears twice")
            seen.add(parts)
        plan.append((member, parts))
    return plan


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Path:
    """Extract a (possibly gzipped) tar archive into ``dest`` safely; returns ``dest``.

    Every header is checked before anything is written, so an unsafe archive leaves ``dest`` untouched.
    """
    dest_path = Path(dest)
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchiveError(f"not a readable tar archive: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UnsafeArchiveError(f"corrupt tar archive: {exc}") from exc
        plan = check_members(
            members,
            max_member_bytes=max_member_bytes,
            max_total_bytes=max_total_bytes,
            max_members=max_members,
        )
        dest_path.mkdir(parents=True, exist_ok=True)
        root = os.path.realpath(dest_path)
        for member, parts in plan:
            target = os.path.join(root, *parts)
            parent = os.path.realpath(os.path.dirname(target))
            if not _inside(root, parent):
                raise UnsafeArchiveError(f"archive member {member.name!r} would be written outside {dest}")
            if member.isdir():
                os.makedirs(target, mode=0o755, exist_ok=True)
                if not _inside(root, os.path.realpath(target)):
                    raise UnsafeArchiveError(f"archive folder {member.name!r} resolves outside {dest}")
                continue
            os.makedirs(parent, mode=0o755, exist_ok=True)
            if not _inside(root, os.path.realpath(os.path.dirname(target))):
                raise UnsafeArchiveError(f"archive member {member.name!r} would be written outside {dest}")
            _write_member(tar, member, target, max_member_bytes)
    return dest_path


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: str, cap: int) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise UnsafeArchiveError(f"archive member {member.name!r} has no data")
    if os.path.islink(target):
        raise UnsafeArchiveError(f"refusing to write {member.name!r} through an existing symlink in dest")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    mode = 0o755 if member.mode & stat.S_IXUSR else 0o644
    fd = os.open(target, flags, mode)
    written = 0
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > cap:
                raise UnsafeArchiveError(f"archive member {member.name!r} is larger than its cap of {cap}")
            out.write(chunk)

"""Checking and extracting downloaded artifacts without trusting them.

:func:`safe_extract` reads a ``.tar.gz`` (or plain ``.tar``) as one stream with its own bounded header
reader: no ``getmembers()``, and no GNU long-name or pax header is read into memory before its size is
checked against ``max_header_bytes``. Each member is checked as it arrives (plain files and folders only; no
absolute name, ``..``, drive, backslash, or a name below a file) and files are written, by this module,
into a private temporary folder beside ``dest``, counted against the size caps while they are written. Only
when the whole archive, up to the gzip trailer, has been read cleanly is that folder renamed to ``dest``; on
any failure it is removed, so nothing appears at ``dest``. Every archive fault raises UnsafeArchiveError.

The default caps follow the archive's own size: it may inflate to ``max(64 MiB, 20 x its compressed
size)``, never more than 64 GiB, unless the caller passes ``max_total_bytes`` / ``max_member_bytes``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from alignd._errors import DestinationExistsError, IntegrityError, UnsafeArchiveError

ABSOLUTE_MAX_TOTAL_BYTES = 64 * 1024**3  # the most a default cap ever allows
DEFAULT_MAX_TOTAL_BYTES = ABSOLUTE_MAX_TOTAL_BYTES  # kept for callers that imported the old name
INFLATE_FLOOR_BYTES = 64 * 1024**2  # small archives may always inflate this far
INFLATE_RATIO = 20  # adapter weights barely compress (~1.1x); 20x leaves room for text-heavy archives
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # a GNU long name / pax header; real ones are a few hundred bytes
MAX_NAME_BYTES = 4096
MAX_NAME_PART_BYTES = 255
TRAILING_SLACK_BYTES = 1024 * 1024  # zero padding after the end marker (tar pads to 10 KiB records)
CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE

_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
}


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


def default_total_cap(compressed_bytes: int) -> int:
    """How far an archive of ``compressed_bytes`` may inflate when the caller sets no cap."""
    return min(ABSOLUTE_MAX_TOTAL_BYTES, max(INFLATE_FLOOR_BYTES, INFLATE_RATIO * compressed_bytes))


def download_cap(max_total_bytes: int | None) -> int:
    """The most bytes a download may stream to disk (the archive cannot extract past its inflate cap)."""
    return max_total_bytes if max_total_bytes is not None else ABSOLUTE_MAX_TOTAL_BYTES


@dataclass(frozen=True)
class ArchiveLimits:
    max_member_bytes: int
    max_total_bytes: int
    max_members: int = DEFAULT_MAX_MEMBERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: bytes
    size: int
    mode: int
    linkname: str


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Source:
    """The archive's decompressed bytes, read in bounded pieces; any read fault is an UnsafeArchiveError."""

    def __init__(self, raw: IO[bytes]) -> None:
        magic = raw.read(2)
        raw.seek(0)
        self._stream: _Readable = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw

    def read_some(self, size: int, what: str) -> bytes:
        try:
            return self._stream.read(size)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; truncation an EOFError
            raise UnsafeArchiveError(f"corrupt or truncated archive (reading {what}): {exc}") from exc

    def read(self, size: int, what: str) -> bytes:
        pieces: list[bytes] = []
        remaining = size
        while remaining:
            piece = self.read_some(min(remaining, CHUNK), what)
            if not piece:
                raise UnsafeArchiveError(f"archive is truncated (reading {what})")
            pieces.append(piece)
            remaining -= len(piece)
        return b"".join(pieces)

    def copy(self, size: int, sink: Callable[[bytes], object], what: str) -> None:
        """Stream ``size`` bytes and the padding to the next 512-byte block into ``sink``."""
        remaining = size
        while remaining:
            piece = self.read(min(remaining, CHUNK), what)
            sink(piece)
            remaining -= len(piece)
        self.read(-size % BLOCK, what)

    def finish(self) -> None:
        """Read to the end so the gzip CRC and length are checked; refuse large trailing data."""
        if self.read_some(TRAILING_SLACK_BYTES, "the end of the archive") and self.read_some(
            1, "the end of the archive"
        ):
            raise UnsafeArchiveError(f"archive has over {TRAILING_SLACK_BYTES} bytes after its end marker")


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax header (POSIX.1-2001)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length_field = data[pos:space] if space > pos else b""
        if not length_field.isdigit() or int(length_field) <= space - pos:
            raise UnsafeArchiveError("archive has a malformed pax header")
        record = data[space + 1 : pos + int(length_field)]
        key, sep, value = record.partition(b"=")
        if not sep or not record.endswith(b"\n"):
            raise UnsafeArchiveError("archive has a malformed pax header record")
        try:
            records[key.decode("utf-8")] = value[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnsafeArchiveError("archive has a pax header that is not UTF-8") from exc
        pos += int(length_field)
    return records


def _pax_int(value: str, key: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise UnsafeArchiveError(f"archive has a pax {key!r} that is not a whole number: {value!r}")
    return int(value)


def _parse_header(buf: bytes) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError) as exc:
        raise UnsafeArchiveError(f"not a tar archive, or a corrupt member header: {exc}") from exc


class _TarReader:
    """Yields one member header at a time, folding GNU long-name and pax headers into it."""

    def __init__(self, source: _Source, limits: ArchiveLimits) -> None:
        self._source = source
        self._limits = limits
        self._global_pax: dict[str, str] = {}

    def next_entry(self) -> _Entry | None:
        """The next member, or None at the end-of-archive marker."""
        extended: dict[bytes, bytes] = {}
        while True:
            buf = self._source.read(BLOCK, "a member header")
            if buf.count(0) == BLOCK:
                # tarfile refuses this too; dropping the header silently would hide a cut archive
                if extended:
                    labels = " and ".join(_EXTENDED[kind] for kind in extended)
                    raise UnsafeArchiveError(f"archive ends after a {labels} header, with no member for it")
                return None
            info = _parse_header(buf)
            if info.type not in _EXTENDED:
                return self._member(info, extended)
            label = _EXTENDED[info.type]
            if info.type in extended:
                raise UnsafeArchiveError(f"archive has two {label} headers for one member")
            if not 0 <= info.size <= self._limits.max_header_bytes:
                # Refused from the size field alone: tarfile would read the whole block into memory first.
                raise UnsafeArchiveError(
                    f"archive has a {label} header of {info.size} bytes, over the limit of "
                    f"{self._limits.max_header_bytes}"
                )
            data = self._source.read(info.size + (-info.size % BLOCK), f"a {label} header")[: info.size]
            if info.type == tarfile.XGLTYPE:
                self._global_pax.update(_parse_pax(data))
            extended[info.type] = data

    def copy_data(self, entry: _Entry, sink: Callable[[bytes], object]) -> None:
        self._source.copy(entry.size, sink, f"member {entry.name!r}")

    def finish(self) -> None:
        self._source.finish()

    def _member(self, info: tarfile.TarInfo, extended: dict[bytes, bytes]) -> _Entry:
        pax = {**self._global_pax, **_parse_pax(extended.get(tarfile.XHDTYPE, b""))}
        if any(key.startswith("GNU.sparse") for key in pax) or info.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchiveError(f"archive member {info.name!r} is a sparse file; refused")
        name, linkname, size, kind = info.name, info.linkname, info.size, info.type
        if tarfile.GNUTYPE_LONGNAME in extended:
            name = extended[tarfile.GNUTYPE_LONGNAME].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if tarfile.GNUTYPE_LONGLINK in extended:
            linkname = (
                extended[tarfile.GNUTYPE_LONGLINK].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            )
        name = pax.get("path") or name
        linkname = pax.get("linkpath") or linkname
        if pax.get("size"):
            size = _pax_int(pax["size"], "size")
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # the old V7 way of marking a folder
        if kind == tarfile.DIRTYPE:
            name = name.rstrip("/") or name
        return _Entry(name=name, kind=kind, size=size, mode=info.mode, linkname=linkname)


def _member_parts(name: str) -> tuple[str, ...]:
    """Normalised relative parts of a member name, or raise UnsafeArchiveError."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"archive member with an empty or NUL name: {name!r}")
    try:
        encoded_length = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise UnsafeArchiveError(f"archive member name is not UTF-8: {name!r}") from exc
    if encoded_length > MAX_NAME_BYTES:
        raise UnsafeArchiveError(f"archive member name is {encoded_length} bytes, over {MAX_NAME_BYTES}")
    if "\\" in name:
        raise UnsafeArchiveError(f"archive member with a backslash in its name: {name!r}")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise UnsafeArchiveError(f"archive member with an absolute path: {name!r}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive member escaping the destination with '..': {name!r}")
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":
        raise UnsafeArchiveError(f"archive member with a drive letter: {name!r}")
    if any(len(p.encode("utf-8")) > MAX_NAME_PART_BYTES for p in parts):
        raise UnsafeArchiveError(
            f"archive member with a name part over {MAX_NAME_PART_BYTES} bytes: {name!r}"
        )
    return parts


def _check_kind(entry: _Entry) -> None:
    if entry.kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        what = "symlink" if entry.kind == tarfile.SYMTYPE else "hardlink"
        raise UnsafeArchiveError(
            f"archive member {entry.name!r} is a {what} (to {entry.linkname!r}); links are refused"
        )
    if entry.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
        raise UnsafeArchiveError(f"archive member {entry.name!r} is a device or fifo; refused")
    if entry.kind not in (*_REGULAR, tarfile.DIRTYPE):
        raise UnsafeArchiveError(
            f"archive member {entry.name!r} has type {entry.kind!r}, not a regular file or folder"
        )
    if entry.size < 0 or (entry.kind == tarfile.DIRTYPE and entry.size != 0):
        raise UnsafeArchiveError(f"archive member {entry.name!r} has an impossible size of {entry.size}")


class _Layout:
    """The files and folders written so far, so a name can never be both (``a`` then ``a/b``)."""

    def __init__(self) -> None:
        self.files: set[tuple[str, ...]] = set()
        self.folders: set[tuple[str, ...]] = set()

    def add(self, name: str, parts: tuple[str, ...], *, is_folder: bool) -> None:
        for depth in range(1, len(parts)):
            if parts[:depth] in self.files:
                raise UnsafeArchiveError(
                    f"archive member {name!r} lies below {'/'.join(parts[:depth])!r}, which is a file"
                )
            self.folders.add(parts[:depth])
        if is_folder:
            if parts in self.files:
                raise UnsafeArchiveError(f"archive folder {name!r} has the name of an earlier file")
            self.folders.add(parts)
            return
        if parts in self.files:
            raise UnsafeArchiveError(f"archive member {name!r} appears twice")
        if parts in self.folders:
            raise UnsafeArchiveError(f"archive file {name!r} has the name of an earlier folder")
        self.files.add(parts)


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _extract_stream(reader: _TarReader, root: str, limits: ArchiveLimits) -> None:
    """Write every member below ``root`` (a fresh private folder), checking each as it arrives."""
    layout = _Layout()
    members = 0
    total = 0
    while (entry := reader.next_entry()) is not None:
        members += 1
        if members > limits.max_members:
            raise UnsafeArchiveError(f"archive has more than the cap of {limits.max_members} members")
        _check_kind(entry)
        parts = _member_parts(entry.name)
        if not parts:
            if entry.kind == tarfile.DIRTYPE:
                continue  # the archive's "./" root
            raise UnsafeArchiveError(f"archive member with an empty name: {entry.name!r}")
        layout.add(entry.name, parts, is_folder=entry.kind == tarfile.DIRTYPE)
        target = os.path.join(root, *parts)
        if entry.kind == tarfile.DIRTYPE:
            os.makedirs(target, mode=0o755, exist_ok=True)
            continue
        if entry.size > limits.max_member_bytes:
            raise UnsafeArchiveError(
                f"archive member {entry.name!r} is {entry.size} bytes, over the cap of {limits.max_member_bytes}"
            )
        total += entry.size
        if total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"archive unpacks to more than the cap of {limits.max_total_bytes} bytes (at {entry.name!r})"
            )
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not _inside(root, os.path.realpath(os.path.dirname(target))):
            raise UnsafeArchiveError(
                f"archive member {entry.name!r} would be written outside the destination"
            )
        _write_file(reader, entry, target)
    reader.finish()


def _write_file(reader: _TarReader, entry: _Entry, target: str) -> None:
    # O_EXCL | O_NOFOLLOW: the folder is ours and fresh, so anything already at `target` is an attack.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    mode = 0o755 if entry.mode & stat.S_IXUSR else 0o644
    fd = os.open(target, flags, mode)
    with os.fdopen(fd, "wb") as out:
        reader.copy_data(entry, out.write)


def check_destination(dest: str | os.PathLike[str]) -> Path:
    """The real path extraction will rename into; DestinationExistsError unless absent or an empty folder."""
    target = Path(os.path.realpath(dest))
    if os.path.lexists(target) and (not target.is_dir() or any(target.iterdir())):
        raise DestinationExistsError(
            f"{os.fspath(dest)} already exists and is not an empty folder; choose a new or empty destination"
        )
    return target


def _move_into_place(staging: str, target: Path, dest: str | os.PathLike[str]) -> None:
    if target.is_dir() and not target.is_symlink():
        with contextlib.suppress(OSError):
            os.rmdir(target)  # succeeds only while it is still empty; rename cannot replace it on every OS
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise DestinationExistsError(
                f"{os.fspath(dest)} appeared while extracting; the extracted files were discarded"
            ) from exc
        raise


def _limits(
    compressed_bytes: int,
    max_member_bytes: int | None,
    max_total_bytes: int | None,
    max_members: int,
    max_header_bytes: int,
) -> ArchiveLimits:
    total = max_total_bytes if max_total_bytes is not None else default_total_cap(compressed_bytes)
    member = max_member_bytes if max_member_bytes is not None else total
    return ArchiveLimits(
        max_member_bytes=member,
        max_total_bytes=total,
        max_members=max_members,
        max_header_bytes=max_header_bytes,
    )


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_member_bytes: int | None = None,
    max_total_bytes: int | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Path:
    """Extract a ``.tar.gz`` or ``.tar`` into ``dest`` (absent or an empty folder), all or nothing.

    ``max_total_bytes`` defaults to :func:`default_total_cap` of the archive's size on disk and
    ``max_member_bytes`` to the total cap. Raises UnsafeArchiveError for any unsafe or corrupt archive and
    DestinationExistsError if ``dest`` holds anything; in both cases nothing is left at ``dest``.
    """
    limits = _limits(
        os.path.getsize(archive), max_member_bytes, max_total_bytes, max_members, max_header_bytes
    )
    target = check_destination(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent)
    try:
        with open(archive, "rb") as raw:
            _extract_stream(_TarReader(_Source(raw), limits), os.path.realpath(staging), limits)
        os.chmod(staging, 0o755)  # mkdtemp made it owner-only while it was being filled
        _move_into_place(staging, target, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(dest)

"""Fuzzing the SDK's artifact extractor (``alignd._archive.safe_extract``) with mutated valid archives.

Property, for every input: ``safe_extract`` either extracts, with every path inside ``dest`` (plain files
and folders only), or raises UnsafeArchiveError and leaves nothing at ``dest``; nothing else is raised, and
nothing is left beside ``dest`` either way (no staging folder). When it extracts, the files are the ones
Python's own tarfile reads from the same archive, byte for byte.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from alignd._archive import safe_extract
from alignd._errors import UnsafeArchiveError
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import mutate
from tests.fuzz.budget import FUZZ_SETTINGS, VARIANTS, scratch_dir, target

WORK = Path(scratch_dir("alignd-fuzz-archive-"))
BLOCK = tarfile.BLOCKSIZE
# Header fields (offset, length) a header-aware edit may rewrite, before the checksum is put right again.
FIELDS = {
    "name": (0, 100),
    "mode": (100, 8),
    "size": (124, 12),
    "type": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "prefix": (345, 155),
}
NASTY_NAMES = [
    b"../x",
    b"/etc/x",
    b"a/../../x",
    b"a\\b",
    b"C:x",
    b"./",
    b"",
    b"a/\x00b",
    b"x" * 300,
    b"a//b/./c",
]
TYPES = [b"0", b"\x00", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"K", b"L", b"x", b"g", b"S", b"Z"]


def seed_archive(rng: random.Random) -> bytes:
    """A valid tar: folders, files (one empty, one executable), long names, in GNU, PAX or USTAR format."""
    out = io.BytesIO()
    fmt = rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if rng.random() < 0.5:
            tar.addfile(_info("./", tarfile.DIRTYPE))
        tar.addfile(_info("adapter", tarfile.DIRTYPE))
        for index in range(rng.randint(1, 4)):
            long_part = "n" * rng.choice([5, 90, 120]) if fmt != tarfile.USTAR_FORMAT else "n" * 5
            name = rng.choice(["adapter/", "", "adapter/sub/"]) + f"{long_part}{index}.bin"
            data = rng.randbytes(rng.choice([0, 1, 511, 512, 700]))
            info = _info(name, tarfile.REGTYPE, len(data))
            info.mode = rng.choice([0o644, 0o755])
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3:
                info.pax_headers = {"comment": "é" * rng.randint(0, 3)}
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o755 if kind == tarfile.DIRTYPE else 0o644, 0
    return info


def _header_blocks(data: bytes) -> list[int]:
    """Offsets of the blocks whose checksum is right: the member and extended headers."""
    offsets = []
    for pos in range(0, len(data) - BLOCK + 1, BLOCK):
        block = data[pos : pos + BLOCK]
        if block.count(0) == BLOCK:
            continue
        try:
            stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            continue
        if stored in _checksums(block):
            offsets.append(pos)
    return offsets


def _checksums(block: bytes) -> tuple[int, int]:
    """A header's checksum, unsigned and signed (readers take either): its bytes summed, the field as spaces."""
    rest = block[:148] + b" " * 8 + block[156:BLOCK]
    return sum(rest), sum(b - 256 if b > 127 else b for b in rest)


def _with_checksum(block: bytearray) -> None:
    block[148:156] = b"%06o\0 " % _checksums(bytes(block))[0]


def edit_header(rng: random.Random, data: bytes) -> bytes:
    """Rewrite one field of one header to something hostile or random, then make its checksum right."""
    headers = _header_blocks(data)
    if not headers:
        return mutate.mutate(rng, data)
    pos = rng.choice(headers)
    block = bytearray(data[pos : pos + BLOCK])
    field = rng.choice(sorted(FIELDS))
    start, length = FIELDS[field]
    if field in ("name", "linkname", "prefix"):
        value = rng.choice([*NASTY_NAMES, rng.randbytes(rng.randint(0, length))])
    elif field == "type":
        value = rng.choice(TYPES)
    elif field == "size":
        value = rng.choice(
            [b"%011o" % rng.choice([0, 1, 513, 2**20, 8**11 - 1]), b"\x80" + b"\0" * 3 + b"\xff" * 8, b"zz"]
        )
    elif field == "mode":
        value = rng.choice([b"0004755", b"0007777", b"garbage", b"0000000"])
    else:
        value = rng.choice([b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"xxxxxxxx"])
    block[start : start + length] = value[:length].ljust(length, b"\0")
    _with_checksum(block)
    return data[:pos] + bytes(block) + data[pos + BLOCK :]


def variant(rng: random.Random, seed: bytes) -> bytes:
    data = seed
    for _ in range(rng.randint(1, 2)):
        choice = rng.randrange(4)
        if choice == 0:
            data = edit_header(rng, data)
        elif choice == 1:
            data = mutate.mutate(rng, data)
        elif choice == 2:
            data = data[: rng.randint(0, len(data))]
        else:  # junk or zeros after the end, or a second copy of a member
            data = data + rng.choice(
                [rng.randbytes(rng.randint(1, 600)), b"\0" * BLOCK * rng.randint(1, 30), data[: BLOCK * 2]]
            )
    if rng.random() < 0.5:
        data = gzip.compress(data, compresslevel=1, mtime=0)
        if rng.random() < 0.2:
            data = mutate.mutate(rng, data)
    return data


def tarfile_view(archive: Path) -> dict[str, bytes]:
    """The regular files Python's tarfile reads from the archive, by normalised name."""
    files: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[os.path.normpath(member.name)] = extracted.read()
    return files


def check_extraction(archive_bytes: bytes) -> bool:
    """Extract in a fresh folder and check the property; True when the archive was extracted."""
    root = Path(tempfile.mkdtemp(dir=WORK))
    try:
        archive = root / "artifact.tar.gz"
        archive.write_bytes(archive_bytes)
        dest = root / "out"
        try:
            safe_extract(archive, dest)
        except UnsafeArchiveError:
            assert not os.path.lexists(dest), "a refused archive left something at dest"
            assert sorted(os.listdir(root)) == ["artifact.tar.gz"], os.listdir(root)
            return False
        assert sorted(os.listdir(root)) == ["artifact.tar.gz", "out"], os.listdir(root)
        real_dest = os.path.realpath(dest)
        extracted: dict[str, bytes] = {}
        for folder, dirs, names in os.walk(dest):
            for entry in [*dirs, *names]:
                path = os.path.join(folder, entry)
                mode = os.lstat(path).st_mode
                assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), f"{path} is neither a file nor a folder"
                assert os.path.realpath(path).startswith(real_dest + os.sep), f"{path} is outside dest"
            for name in names:
                path = os.path.join(folder, name)
                extracted[os.path.relpath(path, dest)] = Path(path).read_bytes()
        # Contents, not names: tarfile cuts a GNU long name at the first NUL of its whole 512-byte block,
        # GNU tar and safe_extract at the header's size; the same members must come out either way.
        assert sorted(extracted.values()) == sorted(tarfile_view(archive).values()), "not what tarfile reads"
        return True
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ_SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_archives(seed: int) -> None:
    rng = random.Random(seed)
    base = seed_archive(rng)
    figures = target("SDK archive extraction")
    with figures.input():
        assert check_extraction(gzip.compress(base, mtime=0)), "a valid archive was refused"
    for _ in range(VARIANTS - 1):
        with figures.input():
            check_extraction(variant(rng, base))

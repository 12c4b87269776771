"""Hostile archives that a header check alone does not stop: bombs, huge headers, half-written folders, bad gzip.

The big archives are real single-member gzip files built fast: a block is deflated once (then the
compressor is reset with a full flush) and its compressed bytes are repeated, so 1 GiB of zeros costs a
1 MB file and well under a second to build, while any gzip reader still inflates every byte and checks the
CRC over all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import alignd
import pytest
from alignd._archive import DEFAULT_MAX_HEADER_BYTES, INFLATE_FLOOR_BYTES, default_total_cap, safe_extract
from alignd._errors import DestinationExistsError

from tests.client.scripted import Reply, ScriptedServer

MIB = 1024**2
GIB = 1024**3


class GzipBuilder:
    """Writes one gzip member whose deflate stream repeats blocks compressed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out = path.open("wb")
        self._out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # magic, deflate, no flags, mtime 0
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._crc = 0
        self.inflated = 0

    def add(self, data: bytes, times: int = 1) -> None:
        # After Z_FULL_FLUSH the compressor refers to no earlier bytes, so these bytes decode alone, each time.
        compressed = self._deflate.compress(data) + self._deflate.flush(zlib.Z_FULL_FLUSH)
        for _ in range(times):
            self._out.write(compressed)
            self._crc = zlib.crc32(data, self._crc)
        self.inflated += len(data) * times

    def add_header(self, info: tarfile.TarInfo) -> None:
        self.add(info.tobuf(format=tarfile.GNU_FORMAT))

    def add_file(self, name: str, size: int, fill: bytes = b"\0") -> None:
        """A regular member of ``size`` bytes of ``fill`` (``size`` a multiple of 1 MiB)."""
        info = tarfile.TarInfo(name)
        info.size = size
        self.add_header(info)
        self.add(fill * MIB, size // MIB)

    def close(self) -> Path:
        self.add(b"\0" * 1024)  # the end-of-archive marker
        self._out.write(self._deflate.flush(zlib.Z_FINISH))
        self._out.write(struct.pack("<II", self._crc, self.inflated & 0xFFFFFFFF))
        self._out.close()
        return self.path


def _bomb(path: Path, member_size: int, members: int) -> Path:
    builder = GzipBuilder(path)
    for i in range(members):
        builder.add_file(f"shard-{i:03}.safetensors", member_size)
    assert builder.inflated >= member_size * members
    return builder.close()


@pytest.fixture(scope="session")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {
        "one_member": _bomb(root / "one.tar.gz", GIB, 1),
        "many_members": _bomb(root / "many.tar.gz", 40 * MIB, 25),  # each under the cap, 1000 MiB together
    }


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind", ["one_member", "many_members"])
def test_gibibyte_bomb_is_refused_by_the_default_caps(
    bombs: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    archive = bombs[kind]
    compressed = archive.stat().st_size
    assert compressed < 2 * MIB
    assert default_total_cap(compressed) == INFLATE_FLOOR_BYTES  # 20x of ~1 MB is under the 64 MiB floor
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(alignd.UnsafeArchiveError, match=f"cap of {INFLATE_FLOOR_BYTES}"):
        safe_extract(archive, work / "adapter")
    # The many-member bomb had its first 40 MiB written to the temporary folder; that folder is gone too.
    assert _listing(work) == []


def test_caps_scale_with_the_archive_and_the_caller_can_raise_them(tmp_path: Path) -> None:
    builder = GzipBuilder(tmp_path / "zeros.tar.gz")
    builder.add_file("adapter_model.safetensors", 72 * MIB)
    archive = builder.close()
    with pytest.raises(alignd.UnsafeArchiveError, match="over the cap"):
        safe_extract(archive, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    dest = safe_extract(archive, tmp_path / "allowed", max_total_bytes=128 * MIB)
    # Extraction read the whole gzip stream and checked its CRC: the builder's archives are genuine.
    assert (dest / "adapter_model.safetensors").stat().st_size == 72 * MIB
    assert default_total_cap(10 * GIB) == 64 * GIB  # the absolute default ceiling
    assert default_total_cap(5 * MIB) == 100 * MIB


def test_download_of_a_bomb_is_refused_and_leaves_nothing(
    server: ScriptedServer, bombs: dict[str, Path], tmp_path: Path
) -> None:
    payload = bombs["one_member"].read_bytes()
    artifact: dict[str, Any] = {"id": "art_1", "object": "artifact", "job": "job_1", "kind": "adapter"}
    artifact |= {"size_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    server.route("GET", "/v1/artifacts/art_1", Reply(200, artifact))
    server.route("GET", "/v1/artifacts/art_1/content", Reply(200, payload))
    downloads = tmp_path / "downloads"
    with (
        alignd.Client(base_url=server.base_url) as client,
        pytest.raises(alignd.UnsafeArchiveError, match="over the cap"),
    ):
        client.artifacts.download("art_1", downloads / "adapter")
    assert _listing(downloads) == []  # no folder, no .part file, no temporary extraction folder


_LONG_HEADERS = {
    "gnu_long_name": tarfile.GNUTYPE_LONGNAME,
    "gnu_long_link": tarfile.GNUTYPE_LONGLINK,
    "pax": tarfile.XHDTYPE,
    "pax_global": tarfile.XGLTYPE,
}

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from alignd import UnsafeArchiveError
    from alignd._archive import safe_extract

    scale = 1 if sys.platform != "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
    messages = []
    for archive, dest in zip(sys.argv[1::2], sys.argv[2::2]):
        try:
            safe_extract(archive, dest)
            messages.append("extracted")
        except UnsafeArchiveError as exc:
            messages.append(str(exc))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale
    print(json.dumps({"growth_kib": after - before, "messages": messages}))
    """
)


def test_huge_long_name_and_pax_headers_are_refused_with_bounded_memory(tmp_path: Path) -> None:
    args: list[str] = []
    for label, kind in _LONG_HEADERS.items():
        builder = GzipBuilder(tmp_path / f"{label}.tar.gz")
        header = tarfile.TarInfo("././@LongLink")
        header.type = kind
        header.size = 512 * MIB
        builder.add_header(header)
        builder.add(b"a" * MIB, 512)  # Python's tarfile reads all of this into one bytes object
        builder.add_file("adapter_config.json", MIB)
        assert builder.close().stat().st_size < MIB
        args += [str(builder.path), str(tmp_path / f"dest-{label}")]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout)
    for message in report["messages"]:
        assert f"header of {512 * MIB} bytes, over the limit of {DEFAULT_MAX_HEADER_BYTES}" in message
    assert report["growth_kib"] < 100 * 1024, report
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def _tar_gz(members: Sequence[tuple[str, bytes | None]]) -> bytes:
    """A .tar.gz of files (bytes) and folders (None), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("members", "phrase"),
    [
        ([("a", b"file"), ("a/b", b"below a file")], "lies below 'a', which is a file"),
        ([("a", None), ("a", b"file")], "has the name of an earlier folder"),
        ([("a/b", b"x"), ("a", b"file")], "has the name of an earlier folder"),
        ([("a", b"file"), ("a", None)], "has the name of an earlier file"),
    ],
)
def test_file_and_folder_clashes_leave_nothing(
    tmp_path: Path, members: list[tuple[str, bytes | None]], phrase: str
) -> None:
    archive = tmp_path / "clash.tar.gz"
    archive.write_bytes(_tar_gz(members))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(alignd.UnsafeArchiveError, match=phrase):
        safe_extract(archive, work / "dest")
    assert _listing(work) == []


_GOOD = [("adapter_config.json", b'{"r": 8}'), ("adapter_model.safetensors", bytes(range(256)) * 400)]


@pytest.mark.parametrize("cut", ["header", "half", "trailer"])
def test_truncated_gzip_is_an_unsafe_archive(tmp_path: Path, cut: str) -> None:
    payload = _tar_gz(_GOOD)
    keep = {"header": 6, "half": len(payload) // 2, "trailer": len(payload) - 4}[cut]
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(payload[:keep])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(alignd.UnsafeArchiveError, match=r"truncated|corrupt"):
        safe_extract(archive, work / "dest")
    assert _listing(work) == []


def test_gzip_with_a_wrong_crc_is_refused(tmp_path: Path) -> None:
    payload = bytearray(_tar_gz(_GOOD))
    payload[-8] ^= 0xFF  # the CRC32 in the gzip trailer: only reading to the very end notices
    archive = tmp_path / "crc.tar.gz"
    archive.write_bytes(bytes(payload))
    with pytest.raises(alignd.UnsafeArchiveError, match="corrupt"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_plain_tar_without_its_end_marker_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    archive = tmp_path / "a.tar"
    archive.write_bytes(buffer.getvalue()[:1024])  # header and data, no end blocks
    with pytest.raises(alignd.UnsafeArchiveError, match="truncated"):
        safe_extract(archive, tmp_path / "dest")
    archive.write_bytes(buffer.getvalue() + b"\0" * (2 * MIB))
    with pytest.raises(alignd.UnsafeArchiveError, match="after its end marker"):
        safe_extract(archive, tmp_path / "dest")
    archive.write_bytes(buffer.getvalue())
    assert (safe_extract(archive, tmp_path / "dest") / "a.txt").read_bytes() == b"abc"


def test_member_count_cap(tmp_path: Path) -> None:
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(_tar_gz([(f"f{i}", b"x") for i in range(5)]))
    with pytest.raises(alignd.UnsafeArchiveError, match="more than the cap of 3 members"):
        safe_extract(archive, tmp_path / "dest", max_members=3)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_archives_packed_from_disk_extract_in_every_tar_format(tmp_path: Path, fmt: int) -> None:
    source = tmp_path / "adapter"
    deep = source / ("d" * 60) / ("e" * 60)  # a path over 100 bytes: ustar prefix, GNU 'L' or pax path
    deep.mkdir(parents=True)
    (deep / "tokenizer.json").write_text("{}")
    (source / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)
    script = source / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    if fmt != tarfile.USTAR_FORMAT:
        (source / "modèle-卡.md").write_text("card")  # non-ASCII: pax header (PAX) or raw UTF-8 (GNU)
    archive = tmp_path / "packed.tar.gz"
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
    dest = safe_extract(archive, tmp_path / "out")
    expected = {p.relative_to(source) for p in source.rglob("*")}
    assert {p.relative_to(dest) for p in dest.rglob("*")} == expected
    for path in source.rglob("*"):
        if path.is_file():
            assert (dest / path.relative_to(source)).read_bytes() == path.read_bytes()
    assert (dest / "run.sh").stat().st_mode & 0o100


def test_existing_empty_folder_is_filled_and_a_full_one_refused_before_download(
    server: ScriptedServer, tmp_path: Path
) -> None:
    payload = _tar_gz(_GOOD)
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(payload)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (safe_extract(archive, empty) / "adapter_config.json").exists()
    with pytest.raises(DestinationExistsError) as info:
        safe_extract(archive, empty)  # now it holds files
    assert isinstance(info.value, alignd.AlignError)
    artifact = {"id": "art_1", "object": "artifact", "size_bytes": len(payload)}
    server.route("GET", "/v1/artifacts/art_1", Reply(200, artifact))
    server.route("GET", "/v1/artifacts/art_1/content", Reply(200, payload))
    with (
        alignd.Client(base_url=server.base_url) as client,
        pytest.raises(FileExistsError, match="not an empty"),
    ):
        client.artifacts.download("art_1", empty)
    assert server.calls("GET", "/v1/artifacts/art_1/content") == []
    assert _listing(tmp_path) == ["empty", "good.tar.gz"]

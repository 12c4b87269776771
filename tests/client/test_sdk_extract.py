"""Safe extraction of downloaded artifacts, and downloads that verify sha256 and drop auth on redirect."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import alignd
import pytest
from alignd._archive import safe_extract
from alignd._errors import DestinationExistsError

from tests.client.scripted import Recorded, Reply, ScriptedServer, scripted_server


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


def _good(tar: tarfile.TarFile) -> None:
    _add_file(tar, "adapter_config.json", b'{"r": 8}')
    _add_file(tar, "adapter_model.safetensors", b"\x00" * 1000)
    _add_file(tar, "./README.md", b"# card")
    _add_file(tar, "sub/tokenizer.json", b"{}")


def _dotdot(tar: tarfile.TarFile) -> None:
    _add_file(tar, "ok.txt", b"fine")
    _add_file(tar, "../escaped.txt", b"evil")


def _nested_dotdot(tar: tarfile.TarFile) -> None:
    _add_file(tar, "sub/../../escaped.txt", b"evil")


def _absolute(tar: tarfile.TarFile) -> None:
    _add_file(tar, "ok.txt", b"fine")
    _add_file(tar, "/tmp/alignd-escaped.txt", b"evil")


def _symlink(tar: tarfile.TarFile) -> None:
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../outside"
    tar.addfile(link)
    _add_file(tar, "link/escaped.txt", b"evil")


def _symlink_inside(tar: tarfile.TarFile) -> None:
    _add_file(tar, "a.txt", b"a")
    link = tarfile.TarInfo("b.txt")
    link.type = tarfile.SYMTYPE
    link.linkname = "a.txt"
    tar.addfile(link)


def _hardlink(tar: tarfile.TarFile) -> None:
    link = tarfile.TarInfo("hard")
    link.type = tarfile.LNKTYPE
    link.linkname = "/etc/passwd"
    tar.addfile(link)


def _device(tar: tarfile.TarFile) -> None:
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    tar.addfile(dev)


def _fifo(tar: tarfile.TarFile) -> None:
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    tar.addfile(fifo)


def _oversize(tar: tarfile.TarFile) -> None:
    _add_file(tar, "ok.txt", b"fine")
    _add_file(tar, "big.bin", b"\x00" * 5000)


BAD = {
    "dotdot": (_dotdot, "'..'"),
    "nested_dotdot": (_nested_dotdot, "'..'"),
    "absolute": (_absolute, "absolute"),
    "symlink": (_symlink, "symlink"),
    "symlink_inside": (_symlink_inside, "symlink"),
    "hardlink": (_hardlink, "hardlink"),
    "device": (_device, "device"),
    "fifo": (_fifo, "fifo"),
    "oversize": (_oversize, "over the cap"),
}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_archives_are_refused_and_write_nothing(tmp_path: Path, case: str) -> None:
    build, phrase = BAD[case]
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = _archive(archives / f"{case}.tar.gz", build)
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest"
    before = _tree(tmp_path)
    with pytest.raises(alignd.UnsafeArchiveError) as info:
        safe_extract(archive, dest, max_member_bytes=1000)
    assert phrase in str(info.value)
    # Extraction goes to a temporary folder removed on failure: nothing appeared, inside or outside dest.
    assert _tree(tmp_path) == before
    assert not dest.exists()
    assert not Path("/tmp/alignd-escaped.txt").exists()


def test_total_size_cap(tmp_path: Path) -> None:
    def many(tar: tarfile.TarFile) -> None:
        for i in range(5):
            _add_file(tar, f"f{i}.bin", b"\x01" * 400)

    archive = _archive(tmp_path / "many.tar.gz", many)
    with pytest.raises(alignd.UnsafeArchiveError, match="more than the cap"):
        safe_extract(archive, tmp_path / "dest", max_total_bytes=1000)
    assert not (tmp_path / "dest").exists()


def test_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"this is not gzip")
    with pytest.raises(alignd.UnsafeArchiveError):
        safe_extract(bogus, tmp_path / "dest")


def test_good_archive_extracts(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "good.tar.gz", _good)
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "adapter_config.json").read_bytes() == b'{"r": 8}'
    assert (dest / "adapter_model.safetensors").stat().st_size == 1000
    assert (dest / "README.md").read_text() == "# card"
    assert (dest / "sub" / "tokenizer.json").read_text() == "{}"


def test_existing_symlink_in_dest_is_not_followed(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "good.tar.gz", _good)
    dest = tmp_path / "out"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    # dest holds something, so extraction (all-or-nothing, renamed into place) refuses it outright.
    with pytest.raises(DestinationExistsError, match="not an empty folder"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []
    assert _tree(dest) == {"sub"}


# -- downloads over HTTP --------------------------------------------------------------------------------


def _artifact(server: ScriptedServer, payload: bytes, sha256: str) -> None:
    server.route(
        "GET",
        "/v1/artifacts/art_1",
        Reply(
            200,
            {
                "id": "art_1",
                "object": "artifact",
                "job": "job_1",
                "stage": "sft",
                "kind": "adapter",
                "size_bytes": len(payload),
                "sha256": sha256,
                "created_at": 1,
            },
        ),
    )


def test_download_verifies_sha256_and_extracts(server: ScriptedServer, tmp_path: Path) -> None:
    payload = _archive(tmp_path / "a.tar.gz", _good).read_bytes()
    _artifact(server, payload, hashlib.sha256(payload).hexdigest())
    server.route(
        "GET", "/v1/artifacts/art_1/content", Reply(200, payload, {"Content-Type": "application/gzip"})
    )
    dest = tmp_path / "downloads" / "adapter"
    with alignd.Client(base_url=server.base_url, api_key="secret") as client:
        folder = client.artifacts.download("art_1", dest)
    assert folder == dest
    assert (folder / "adapter_config.json").exists()
    # The temporary .part file is gone; only the extracted folder remains.
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["adapter"]


def test_download_with_wrong_sha256_is_refused(server: ScriptedServer, tmp_path: Path) -> None:
    payload = _archive(tmp_path / "a.tar.gz", _good).read_bytes()
    _artifact(server, payload, "0" * 64)
    server.route("GET", "/v1/artifacts/art_1/content", Reply(200, payload))
    downloads = tmp_path / "downloads"
    with (
        alignd.Client(base_url=server.base_url) as client,
        pytest.raises(alignd.IntegrityError, match="sha256"),
    ):
        client.artifacts.download("art_1", downloads / "adapter")
    assert list(downloads.iterdir()) == []  # neither the folder nor the temporary file


def test_download_follows_redirect_without_authorization(server: ScriptedServer, tmp_path: Path) -> None:
    payload = _archive(tmp_path / "a.tar.gz", _good).read_bytes()
    _artifact(server, payload, hashlib.sha256(payload).hexdigest())
    with scripted_server() as storage:
        storage.route("GET", "/bucket/art_1.tar.gz", Reply(200, payload))
        location = f"{storage.base_url}/bucket/art_1.tar.gz?X-Amz-Signature=abc"
        server.route("GET", "/v1/artifacts/art_1/content", Reply(307, "", {"Location": location}))
        with alignd.Client(base_url=server.base_url, api_key="secret") as client:
            folder = client.artifacts.download("art_1", tmp_path / "adapter")
        assert (folder / "adapter_model.safetensors").exists()
        (presigned,) = storage.calls("GET", "/bucket/art_1.tar.gz")
    assert presigned.param("X-Amz-Signature") == "abc"
    assert "authorization" not in presigned.headers
    api_call: Recorded = server.calls("GET", "/v1/artifacts/art_1/content")[0]
    assert api_call.headers["authorization"] == "Bearer secret"


def test_same_origin_redirect_keeps_authorization(server: ScriptedServer, tmp_path: Path) -> None:
    payload = _archive(tmp_path / "a.tar.gz", _good).read_bytes()
    _artifact(server, payload, hashlib.sha256(payload).hexdigest())
    server.route("GET", "/v1/artifacts/art_1/content", Reply(307, "", {"Location": "/blob/art_1"}))
    server.route("GET", "/blob/art_1", Reply(200, payload))
    with alignd.Client(base_url=server.base_url, api_key="secret") as client:
        client.artifacts.download("art_1", tmp_path / "adapter")
    assert server.calls("GET", "/blob/art_1")[0].headers["authorization"] == "Bearer secret"

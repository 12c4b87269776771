"""Inputs the fuzzers found that crashed something, kept as regression tests (run by `make test`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
from alignd import validation
from alignd._archive import safe_extract
from alignd._errors import UnsafeArchiveError
from safetensors import SafetensorError, safe_open

from service.core.errors import ValidationFailed
from service.core.models import check_model_files, read_safetensors_header
from tests.conftest import LiveServer

# A \ud800 escape alone is a lone surrogate: the stdlib parser took it, the role check quoted it in its
# message, and the server's 422 body could not be encoded as UTF-8 (500, connection reset).
LONE_SURROGATE_ROLE = (
    b'{"messages": [{"role": "\\ud800", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
)
LONE_SURROGATE_PROMPT = b'{"prompt": "\\udc00", "completion": "ok"}\n'


@pytest.mark.parametrize("line", [LONE_SURROGATE_ROLE, LONE_SURROGATE_PROMPT, b'{"\\udbff": 1}\n'])
def test_lone_surrogate_escapes_are_invalid_json(line: bytes) -> None:
    report = validation.validate_stream(io.BytesIO(line), "sft")
    assert [issue["code"] for issue in report.issues] == ["invalid_json"]
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # the server's 422 body
    with pytest.raises(validation.DatasetLineError) as info:
        list(validation.iter_records(io.BytesIO(line)))
    assert info.value.code == "invalid_json"


def test_surrogate_pairs_and_escaped_backslashes_stay_valid() -> None:
    lines = b'{"prompt": "\\ud83d\\ude00", "completion": "\\\\ud800 is text"}\n'
    assert validation.validate_stream(io.BytesIO(lines), "sft").ok


def test_server_answers_422_for_a_lone_surrogate(live_server: LiveServer) -> None:
    with live_server.client() as client:
        response = client.post(
            "/v1/datasets",
            data={"kind": "sft"},
            files={"file": ("d.jsonl", LONE_SURROGATE_ROLE, "application/jsonl")},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["code"] == "invalid_json"


@pytest.mark.parametrize("chunk_size", [1, 2, 1 << 18])
def test_bom_counts_toward_the_first_lines_length_at_any_chunk_size(chunk_size: int) -> None:
    # Found by the chunk-size differential: streamed in small reads the BOM counted toward line 1's length,
    # read in one chunk it did not, so the same file was line_too_long or not depending on the read size.
    data = b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n'
    cap = len(data) - 4  # over the cap with the BOM's 3 bytes, under it without them
    report = validation.validate_stream(io.BytesIO(data), "sft", max_line_bytes=cap, chunk_size=chunk_size)
    assert [(i["line"], i["code"]) for i in report.issues] == [(1, "line_too_long")]
    assert validation.validate_stream(
        io.BytesIO(data), "sft", max_line_bytes=cap + 3, chunk_size=chunk_size
    ).ok


def _safetensors(tmp_path: Path, header: bytes, data: bytes) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def test_safetensors_header_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    # Found by the header fuzzer: json.loads kept the last "shape", so the check passed a file that the
    # safetensors library refuses to open ("duplicate field `shape`").
    header = b'{"w": {"dtype": "F32", "shape": [1], "shape": [2], "data_offsets": [0, 8]}}'
    path = _safetensors(tmp_path, header, b"\0" * 8)
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")
    with pytest.raises(ValidationFailed) as info:
        read_safetensors_header("model.safetensors", path)
    assert info.value.code == "invalid_safetensors" and "appears twice" in info.value.message


def test_file_name_with_a_lone_surrogate_is_refused_with_an_encodable_body(tmp_path: Path) -> None:
    # Found by the folder fuzzer: the name was refused, but the 422 body quoted it raw and could not be
    # encoded as UTF-8; a name that is only a lone surrogate away from plain was not refused at all.
    path = tmp_path / "part"
    path.write_bytes(b"{}")
    for name in ["a\udb64", "\udc80config.json"]:
        with pytest.raises(ValidationFailed) as info:
            check_model_files([(name, path)])
        assert info.value.code == "invalid_filename"
        json.dumps(info.value.to_body(), ensure_ascii=False).encode("utf-8")


def _tiny_weights(tmp_path: Path) -> Path:
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    return _safetensors(tmp_path, header, b"\0" * 8)


def test_lone_surrogates_in_model_json_files_are_refused(tmp_path: Path) -> None:
    # Found by the model fuzzers: json.loads takes \udc00 alone; the safetensors library does not, and a
    # shard name holding one made the 422 body (or an architecture name, the response) unencodable.
    header = (
        b'{"__metadata__": {"x": "\\udc00"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    )
    path = _safetensors(tmp_path, header, b"\0" * 8)
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")
    with pytest.raises(ValidationFailed) as info:
        read_safetensors_header("model.safetensors", path)
    assert info.value.code == "invalid_safetensors"

    (tmp_path / "w").mkdir()
    weights = _tiny_weights(tmp_path / "w")
    config = tmp_path / "config"
    config.write_bytes(b'{"architectures": ["LlamaForCausalLM"]}')
    index = tmp_path / "index"
    index.write_bytes(b'{"weight_map": {"w": "model\\udc00.safetensors"}}')
    files = [("config.json", config), ("model.safetensors", weights), ("model.safetensors.index.json", index)]
    with pytest.raises(ValidationFailed) as info:
        check_model_files(files)
    assert info.value.code == "invalid_index"
    json.dumps(info.value.to_body(), ensure_ascii=False).encode("utf-8")


def test_server_answers_422_for_a_lone_surrogate_architecture(
    live_server: LiveServer, tmp_path: Path
) -> None:
    weights = _tiny_weights(tmp_path).read_bytes()
    files = [
        ("files", ("config.json", b'{"architectures": ["\\ud800"]}', "application/json")),
        ("files", ("model.safetensors", weights, "application/octet-stream")),
    ]
    with live_server.client() as client:
        response = client.post("/v1/models", data={"name": "m"}, files=files)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_config"


def test_archive_ending_after_a_long_name_header_is_refused(tmp_path: Path) -> None:
    # Found by the archive fuzzer's differential against tarfile: a GNU long-name header followed by the
    # end-of-archive marker was dropped silently and the rest extracted; tarfile refuses the archive.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("first.txt"), io.BytesIO(b""))
        info = tarfile.TarInfo("n" * 200)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    first_member, long_name = 512, 1024  # header of first.txt; the long-name header and its one data block
    archive = tmp_path / "cut.tar"
    archive.write_bytes(out.getvalue()[: first_member + long_name] + b"\0" * 1024)
    with pytest.raises(tarfile.ReadError), tarfile.open(archive) as tar:
        tar.getmembers()
    with pytest.raises(UnsafeArchiveError, match="GNU long-name header, with no member"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _candidates_line(depth: int) -> bytes:
    extra = "[" * depth + "]" * depth
    return (
        b'{"prompt": [{"role": "user", "content": "hi", "meta": %s}], "responses": ["a", "b"]}\n'
        % extra.encode()
    )


def test_deep_field_inside_a_message_is_json_too_deep() -> None:
    ok = validation.validate_stream(io.BytesIO(_candidates_line(validation.MAX_EXTRA_DEPTH)), "candidates")
    assert ok.ok
    deep = validation.validate_stream(
        io.BytesIO(_candidates_line(validation.MAX_EXTRA_DEPTH + 1)), "candidates"
    )
    assert [(i["line"], i["code"]) for i in deep.issues] == [(1, "json_too_deep")]
    assert '"prompt[0]": field "meta"' in deep.issues[0]["message"]


def test_deepest_accepted_message_field_is_served_and_a_deeper_one_refused(live_server: LiveServer) -> None:
    # Found by probing the feedback flow: a 500-deep field in a prompt message passed the upload, and
    # GET /v1/feedback-sets/{id}/next then answered 500 (its serializer recursed past its limit).
    with live_server.client() as client:

        def upload(depth: int) -> httpx.Response:
            files = {"file": ("c.jsonl", _candidates_line(depth), "application/jsonl")}
            return client.post("/v1/datasets", data={"kind": "candidates"}, files=files)

        refused = upload(500)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["details"][0]["code"] == "json_too_deep"
        accepted = upload(validation.MAX_EXTRA_DEPTH)
        assert accepted.status_code == 201, accepted.text
        created = client.post("/v1/feedback-sets", json={"name": "deep", "candidates": accepted.json()["id"]})
        assert created.status_code == 201, created.text
        served = client.get(f"/v1/feedback-sets/{created.json()['id']}/next", params={"annotator": "ann1"})
        assert served.status_code == 200, served.text


@pytest.mark.parametrize("shape", [[0, 2**65], [2**32, 2**32, 0], [2**63]])
def test_safetensors_shape_past_64_bits_is_refused_as_the_library_does(
    tmp_path: Path, shape: list[int]
) -> None:
    # Found by the header fuzzer (make fuzz): [0, 2**65] holds no element, so its 0 bytes passed here, but the
    # library reads dimensions as usize and multiplies them with overflow checks, and refuses the file.
    header = json.dumps({"t": {"dtype": "BOOL", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = _safetensors(tmp_path, header, b"")
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")
    with pytest.raises(ValidationFailed) as info:
        read_safetensors_header("model.safetensors", path)
    assert info.value.code == "invalid_safetensors"
